"""A 2-layer model on a 16x16 grid of 256 codes: end-to-end runs on a laptop CPU in seconds (tests)."""
from npp_jax import config_lib


def get_config(arg: str | None = None):
  del arg
  return config_lib.tiny_config()
