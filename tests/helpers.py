"""Helpers shared by several test files (tests/ is on sys.path under pytest)."""

import glob
import os

import flax.linen as nn
import jax

from npp_jax import config_lib
from npp_jax.models import gpt


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


def random_params(cfg, seed=0):
  """Init, then make every weight random: the output layer starts at zero and would hide
  everything."""
  model = gpt.GPT(cfg)
  params = nn.unbox(
    model.init(jax.random.key(seed), *gpt.example_inputs(cfg, zeros=True))["params"]
  )
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [
    0.3 * jax.random.normal(k, x.shape, x.dtype) + (1.0 if x.ndim == 1 else 0.0)
    for k, x in zip(keys, leaves)
  ]
  return model, jax.tree.unflatten(tree, leaves)


def read_scalars(workdir):
  """{tag: [(step, value)]} of every scalar in the TensorBoard event files written to workdir."""
  # tensorboard's own reader, as TensorBoard reads them: no TensorFlow needed (npp_jax.summaries).
  from tensorboard.backend.event_processing import event_file_loader
  from tensorboard.util import tensor_util

  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents*"))):
    for event in event_file_loader.EventFileLoader(path).Load():
      for v in event.summary.value:
        if v.HasField("tensor") and v.metadata.plugin_data.plugin_name == "scalars":
          out.setdefault(v.tag, []).append((event.step, float(tensor_util.make_ndarray(v.tensor))))
  return out
