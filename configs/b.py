"""GPT-B class-conditional on ImageNet 256 (16x16 VQ-16 codes): the paper's recipe (NPP.md).

python -m npp_jax.main --config=configs/b.py --workdir=DIR --config.data.path=CODES
python -m npp_jax.main --config=configs/b.py:runlocal ...   # shrunk model and batch, for a laptop
# FID / IS of 5,000 samples every 10k steps in TensorBoard (README, "TensorBoard"): add
#   --config.evaluate.every_steps=10000 --config.evaluate.num_samples=5000
#   --config.sample.vq_checkpoint=VQ --config.evaluate.reference=REF.npz
--config.evaluate.inception=WEIGHTS
"""

import pathlib

from npp_jax import config_lib

common = config_lib.load_module(pathlib.Path(__file__).with_name("common.py"))


def get_config(arg: str | None = None):
  arg = config_lib.config_arg(arg, "runlocal")
  c = (
    config_lib.base_config()
  )  # Its defaults are the paper's recipe: batch 256, lr 1e-4, 300 epochs, L = 3.
  c.model.name = "GPT-B"
  c.sample.cfg_scale = 2.0  # Guidance: the reported best for GPT-B (FID 4.47).
  return common.runlocal(c) if arg == "runlocal" else c
