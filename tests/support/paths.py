"""Where the checkout is: the CLI runs from its root (configs/ is addressed relative to it)."""

import os

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
