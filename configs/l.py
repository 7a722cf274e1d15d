"""GPT-L class-conditional on ImageNet 256 (16x16 VQ-16 codes): the paper's recipe (NPP.md).

  python -m npp_jax.main --config=configs/l.py --workdir=DIR --config.data.path=CODES
  python -m npp_jax.main --config=configs/l.py:runlocal ...   # shrunk model and batch, for a laptop
"""
from npp_jax import config_lib


def get_config(arg: str | None = None):
  return config_lib.release_config("GPT-L", cfg_scale=1.75, arg=arg)
