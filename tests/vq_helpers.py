"""The tiny VQ config shared by the VQ job tests (tests/ is on sys.path under pytest)."""

from npp_jax import config_lib


def tiny_config(workdir=None, **overrides):
  """A 2-level VQ (32 px -> 16x16 codes of 64) with matching GPT fields; digits for both jobs."""
  c = config_lib.base_config()
  c.vq.ch, c.vq.ch_mult, c.vq.num_res_blocks, c.vq.z_channels, c.vq.norm_groups = (
    16,
    (1, 2),
    1,
    16,
    4,
  )
  c.vq.codebook_size, c.vq.codebook_embed_dim, c.vq.image_size = 64, 8, 32
  c.model.grid, c.model.vocab_size, c.model.num_classes = (16, 16), 64, 10
  t = c.vq_train
  t.dataset, t.split, t.steps, t.batch_size, t.lr = "digits", "test", 6, 16, 3e-3
  t.log_every_steps, t.checkpoint_every_steps, t.keep_checkpoints, t.num_threads = 1, 3, 2, 2
  e = c.extract
  e.dataset, e.split, e.aug, e.batch_size, e.num_threads = "digits", "test", "flip", 128, 2
  c.update_from_flattened_dict(overrides)  # {'train.max_steps': 2, ...}
  return c
