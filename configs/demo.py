"""The embedded demo: VQ + NPP GPT + next-token baselines on 5000 MNIST digits, about 12 minutes on
2 cores.

  python -m npp_jax.main --mode=demo --config=configs/demo.py --workdir=workdir/demo
  python -m npp_jax.main --mode=demo --config=configs/demo.py --config.demo.seeds=2 ...  # a spread
  python -m npp_jax.main --mode=demo --config=configs/demo.py:smoke ...   # seconds, for the tests
  python -m npp_jax.main --mode=demo --config=configs/demo.py:text ...    # captions (demo/text.py)
  python -m npp_jax.main --mode=demo --config=configs/demo.py:text_smoke ...

32x32 digits through a VQ with two downsamplings -> an 8x8 code grid: every token costs a quarter of
a 16x16 grid's, which buys a GPT wide and deep enough to learn its class condition in minutes.
k = 2, 1 (patch_level 2, the release README's setting) leaves 4x4 then 8x8 patch grids. The sizes
below come from timings on 2 CPU cores (docs/performance.md, "The demo").
"""

import ml_collections

from npp_jax import config_lib


def get_config(arg: str | None = None):
  arg = config_lib.config_arg(arg, "smoke", "text", "text_smoke")
  c = config_lib.base_config()
  # Small channel counts: XLA's CPU convolutions cost about as much at any width below 32.
  c.vq.ch, c.vq.ch_mult, c.vq.num_res_blocks = 16, (1, 2, 2), 1  # Two downsamplings: 32 px -> 8x8.
  c.vq.z_channels, c.vq.norm_groups = 16, 4
  c.vq.codebook_size, c.vq.codebook_embed_dim = 256, 8
  c.vq.image_size = 32

  c.model.name = "custom"
  c.model.n_layer, c.model.n_head, c.model.dim = 4, 4, 128
  c.model.multiple_of = 32
  c.model.vocab_size, c.model.num_classes = c.vq.codebook_size, 10
  c.model.grid = (8, 8)
  c.model.dtype = "float32"  # CPU: bf16 matmuls are slower than fp32 there.
  # No dropout: at 6 epochs nothing overfits (next-token's held-out NLL 1.13 against a final
  # training loss of 1.05 to 1.15), and the masks cost CPU time. class_dropout stays: it trains the
  # null class CFG needs.
  c.model.token_dropout = c.model.resid_dropout = c.model.ffn_dropout = 0.0

  c.train.epochs = 6
  c.npp.patch_level = 2  # k = 2 then 1; an 8x8 grid leaves only 2x2 patches at k = 4 (L = 3).
  # Batch 16: about the same CPU time per image as 32 at k = 1 (the trainer's step_s: 0.11 to 0.13 s
  # against
  # 0.23 to 0.31 s) and twice the updates. Sample accuracy rose with every halving: batch 64 -> 32
  # -> 16 took NPP from 0.38 to 0.74 to 0.82 (docs/performance.md, "The demo").
  c.train.global_batch_size = 16
  c.train.log_every_steps = 20
  c.train.checkpoint_every_steps = 500
  c.optim.lr, c.optim.end_lr = 2e-3, 2e-4
  c.optim.warmup_epochs = 0.5
  c.mesh.shape = (-1, 1, 1)

  c.vq_train.dataset = "digits"
  c.vq_train.random_flip = False  # A mirrored digit is another glyph.
  c.vq_train.steps = 200
  # Batch 32: 0.38 to 0.41 s per step against 0.86 to 1.05 s at 64 on 2 cores (the trainer's step_s:
  # XLA's
  # CPU convolutions slow down more than linearly with the batch): the VQ takes 2 minutes instead of
  # 4, and its reconstructions score 0.96 against 0.94.
  c.vq_train.batch_size = 32
  c.vq_train.lr = 3e-3
  c.vq_train.log_every_steps = 50
  c.vq_train.checkpoint_every_steps = 200
  c.extract.dataset = "digits"
  c.extract.aug = "none"  # A mirrored digit is another glyph: no flips, no crops.
  c.extract.batch_size = 250

  c.sample.num_images = 500  # 50 per digit: enough for a stable Frechet distance in 64 features.
  c.sample.batch_size = 128  # A multiple of any device count up to 128; the last batch is padded.
  c.sample.cfg_scale = 2.0
  c.sample.temperature = (
    0.9  # Picked on the recipe's checkpoints against guidance 3.0, 4.0 and temperature 1.0.
  )
  c.sample.grid_cols = 10

  # The demo job's own knobs (npp_jax.demo): they mean something only with this digits recipe, so
  # they live here rather than in every config's schema.
  c.demo = ml_collections.ConfigDict()
  c.demo.classifier_epochs = 6
  c.demo.grid_cols = 10  # Samples per class row in the PNG grids.
  c.demo.png_scale = (
    3  # Nearest-neighbour upscaling of the PNG grids (32 px digits are hard to see).
  )
  c.demo.seeds = (
    1  # GPT seeds per row (the VQ and the scorer are shared); 2 or more give the table a spread.
  )
  if arg.startswith("text"):
    # npp_jax/demo/text.py: captions of up to 8 tokens (the longest phrasing has 4 words and EOS)
    # from a random-weight T5 as wide as the model's condition.
    c.model.condition, c.model.cls_token_num, c.model.caption_dim = "text", 8, 64
    c.sample.images_per_caption = 13  # 40 held-out captions (2 phrasings x 2 words x 10 digits).
    # Held-out accuracy 0.43 at 6 epochs, 0.49 at 12 (docs/performance.md, "The text demo").
    c.train.epochs = 12
  if arg in ("smoke", "text_smoke"):  # Every stage in seconds, for the tests.
    c.model.n_layer, c.model.n_head, c.model.dim = 1, 1, 32
    c.vq_train.steps, c.vq_train.batch_size = 20, 32
    c.train.epochs = 2  # The fewest that keep both NPP stages: k = 2 for 1 epoch, then k = 1.
    c.train.global_batch_size = 256  # Divides over 1, 2, 4 or 8 devices (the tests use 8).
    c.train.log_every_steps = 1
    c.sample.num_images, c.sample.batch_size = 80, 80
    c.demo.classifier_epochs = 1
    c.demo.grid_cols = 8
    c.sample.images_per_caption = 2
  return c
