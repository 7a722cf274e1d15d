"""What the release configs (b.py ... xxxl.py) share beyond the schema's defaults; not a config file
itself.

The schema's defaults (npp_jax/config_lib.py) are the paper's recipe, so a size's config sets only
its model name and guidance scale. Its `runlocal` variant is the same for every size: the code paths
of the full recipe (the coarse-to-fine stages, warmup, logging) on a model and batch a laptop CPU
runs in minutes.
"""


def runlocal(c):
  c.model.name = "custom"
  c.model.n_layer, c.model.n_head, c.model.dim = 2, 4, 64
  c.model.dtype = "float32"  # bf16 matmuls are slower than fp32 on CPUs.
  c.train.global_batch_size = 8
  c.train.epochs = 4  # Still three stages (k = 4, 2, 1 at L = 3, r = 0.5: epochs 1, 2, 4).
  c.train.log_every_steps = 1
  c.optim.warmup_epochs = 0.5
  return c
