"""Tiny configs, small enough to compile in seconds: the GPT (tiny_model_config) and the VQ with
the jobs around it (tiny_vq_config)."""

from npp_jax import config_lib


def tiny_model_config(**kw):
  """A 2-layer fp32 GPT small enough to compile in seconds; keyword arguments override fields."""
  m = config_lib.model_config("custom")
  m.n_layer, m.n_head, m.dim = 2, 4, 32
  m.vocab_size, m.num_classes, m.grid = 64, 10, (8, 8)
  m.multiple_of = 32
  m.dtype = "float32"
  for key, value in kw.items():
    m[key] = value
  return m


def tiny_vq_config(workdir=None, **overrides):
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
