"""GPT-XXXL class-conditional on ImageNet 256 (16x16 VQ-16 codes): the paper's recipe (NPP.md).

python -m npp_jax.main --config=configs/xxxl.py --workdir=DIR --config.data.path=CODES
python -m npp_jax.main --config=configs/xxxl.py:runlocal ...   # shrunk model and batch, for a
laptop
"""

import pathlib

from npp_jax import config_lib

common = config_lib.load_module(pathlib.Path(__file__).with_name("common.py"))


def get_config(arg: str | None = None):
  arg = config_lib.config_arg(arg, "runlocal")
  c = (
    config_lib.base_config()
  )  # Its defaults are the paper's recipe: batch 256, lr 1e-4, 300 epochs, L = 3.
  c.model.name = "GPT-XXXL"
  c.sample.cfg_scale = 1.65  # Guidance: not reported for NPP: GPT-XXL's.
  return common.runlocal(c) if arg == "runlocal" else c
