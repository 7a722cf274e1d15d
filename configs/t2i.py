"""LlamaGen's text-to-image GPT (NPP.md, "Text to image") trained with NPP: FLAN-T5-XL caption
features (120 positions x 2048) in front of the VQ-16 code grid, LlamaGen's t2i recipe, the NPP
schedule.

python -m npp_jax.main --config=configs/t2i.py:XL --workdir=DIR --config.data.path=CAPTION_CODES
  :XL        GPT-XL at 256 px (16x16 codes): the layout of the released t2i_XL_stage1_256.pt
  :XL_512    GPT-XL at 512 px (32x32 codes, t2i_XL_stage2_512.pt); LlamaGen starts it from stage 1:
             --config.train.init_from=STAGE1_RUN (RoPE follows the grid; no weight depends on it)
  :B :L :XXL :XXXL :1B :3B :7B   the other LlamaGen sizes at 256 px (append _512 for 512 px), for
             experiments: only GPT-XL has released t2i weights
  :runlocal  a 2-layer text model, batch 8, on the same caption layout: a laptop runs it in minutes
python -m npp_jax.convert --kind=gpt --src=t2i_XL_stage1_256.pt --config=configs/t2i.py:XL --dst=DIR
python -m npp_jax.convert --kind=vq --src=vq_ds16_t2i.pt --config=configs/t2i.py:XL --dst=DIR

The recipe is LlamaGen's t2i script defaults (the values it trained with are unpublished): AdamW
lr 1e-4, wd 0.05, betas (0.9, 0.95), global batch 256, 300 epochs, bf16, clip 1.0, dropout 0.1 and
caption drop 0.1; the coarse-to-fine NPP schedule and its per-stage learning rate are the class
configs' (L = 3, r = 0.5, warmup 5 epochs per stage). Sampling defaults are LlamaGen's t2i ones:
guidance 7.5, top-k 1000.
"""

import pathlib

from npp_jax import config_lib
from npp_jax.models import gpt

common = config_lib.load_module(pathlib.Path(__file__).with_name("common.py"))

SIZES = tuple(name.removeprefix("GPT-") for name in gpt.MODEL_SIZES)  # B, L, ..., 7B
ARGS = (*SIZES, *(f"{s}_512" for s in SIZES), "runlocal")
CAPTION_TOKENS = 120  # FLAN-T5 tokens per caption, EOS included (LlamaGen's max length).
CAPTION_DIM = 2048  # FLAN-T5-XL's encoder width.


def get_config(arg: str | None = None):
  arg = config_lib.config_arg(arg, *ARGS)
  if not arg:  # There is no default size.
    raise ValueError(f"configs/t2i.py takes a size; expected configs/t2i.py:ARG, ARG one of {ARGS}")
  c = config_lib.base_config()  # Its optimizer, batch and epochs are LlamaGen's t2i defaults too.
  m = c.model
  m.condition, m.cls_token_num, m.caption_dim = "text", CAPTION_TOKENS, CAPTION_DIM
  m.class_dropout = 0.1  # The whole caption replaced by the null caption, for guidance.
  c.sample.cfg_scale = 7.5
  c.sample.top_k = 1000
  if arg == "runlocal":  # The caption layout stays LlamaGen's; only model and batch shrink.
    return common.runlocal(c)
  size, _, px = arg.partition("_")
  m.name = f"GPT-{size}"
  if px == "512":
    m.grid = (32, 32)  # 512 px through the VQ-16.
    c.vq.image_size = 512
  return c
