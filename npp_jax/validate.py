"""Small input checks shared by the jobs and the library: one-line ValueErrors that name the bad value.

Every check returns the value it accepted (normalised), so a caller writes `n = validate.positive_int(...)`.
"""

import re
from typing import Any

import numpy as np


def positive_int(value: Any, name: str) -> int:
  """An int >= 1 (numpy ints too; bool refused: True is not a count)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def split_name(split: Any, field: str = "split") -> str:
  """A plain split name: TFDS parses '+', '[' and '%' as split arithmetic, which no job here asks for."""
  if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_]+", split):
    raise ValueError(
      f"{field}={split!r}; a split must be a name of letters, digits and '_' (a plain split "
      "name, e.g. 'train')"
    )
  return split
