"""The embedded demo: VQ + NPP GPT + next-token baseline on 5000 MNIST digits, under 10 minutes on 2 cores.

  python -m npp_jax.main --mode=demo --config=configs/demo.py --workdir=workdir/demo
  python -m npp_jax.main --mode=demo --config=configs/demo.py:smoke ...   # seconds, for the tests
"""
from npp_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.demo_config(smoke=(arg == "smoke"))
