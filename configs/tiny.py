"""A 2-layer model on a 16x16 grid of 256 codes: end-to-end runs on a laptop CPU in seconds (tests).

python -m npp_jax.main --config=configs/tiny.py --workdir=DIR --config.data.path=CODES
python -m npp_jax.main --config=configs/tiny.py:text ...   # text model: 8 x 32 caption features
"""

from npp_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.config_arg(arg, "text")
  c = config_lib.base_config()
  c.model.name = "custom"
  c.model.n_layer, c.model.n_head, c.model.dim = 2, 2, 64
  c.model.vocab_size, c.model.num_classes = 256, 10
  c.model.multiple_of = 32
  c.model.dtype = "float32"
  c.model.token_dropout = c.model.resid_dropout = c.model.ffn_dropout = (
    0.0  # Tests compare exact losses.
  )
  c.train.global_batch_size = 16  # Divides over 1, 2, 4 or 8 devices (the tests use 8).
  c.train.epochs = 8
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 4
  # A model this small learns the tests' code patterns within a few dozen steps at this rate.
  c.optim.lr = 3e-3
  c.optim.end_lr = 3e-4
  c.optim.warmup_epochs = 0.5
  if arg == "text":
    # configs/t2i.py's model, tiny: 8 caption positions of 32 features (LlamaGen: 120 x 2048).
    c.model.condition, c.model.cls_token_num, c.model.caption_dim = "text", 8, 32
  return c
