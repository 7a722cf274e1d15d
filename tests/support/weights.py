"""Random weights, built fast: the GPT's (random_params), the VQ's (random_vq_params) and the FID
Inception's in pytorch-fid's layout (random_inception_state).

random_vq_params: VQ weights of the real class without compiling its init. `VQModel.init` traces
the whole encoder and decoder and XLA then compiles them with every initializer's threefry
expansion: 80 s on 2 cores (Intel Xeon, 2026-12-07) for configs/demo.py:smoke's 200 k parameters,
paid again for every VQ config a test uses. The shapes come from `jax.eval_shape` (no compile) and
the values from NumPy, drawn as Flax's defaults draw them.
"""

import flax.linen as nn
import jax
import numpy as np

from npp_jax import convert
from npp_jax.models import gpt
from npp_jax.models import inception
from npp_jax.models import vq


def random_vq_params(cfg: vq.VQConfig, seed: int = 0):
  """A params tree with vq.init_params's structure, shapes and dtypes, and values from the same
  distributions: conv kernels N(0, 1/fan_in) (Flax's lecun_normal, not truncated), biases 0, norm
  scales 1, the codebook U(-1/n, 1/n) with L2-normalised rows (the release's init)."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(0.0, 1.0 / np.sqrt(np.prod(x.shape[:-1])), x.shape)
    elif name == "embedding":
      value = rng.uniform(-1.0 / x.shape[0], 1.0 / x.shape[0], x.shape)
      value /= np.linalg.norm(value, axis=-1, keepdims=True)
    elif name == "scale":
      value = np.ones(x.shape)
    elif name == "bias":
      value = np.zeros(x.shape)
    else:
      raise ValueError(f"VQ parameter {jax.tree_util.keystr(path)}: no initializer for it here")
    return value.astype(x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, vq.abstract_params(cfg))


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


def _random_inception_leaf(rng, leaf: str, shape, fan_in: int) -> np.ndarray:
  """One FID Inception weight, scaled so activations stay O(1) through 47 layers."""
  if leaf == "kernel":
    x = rng.normal(0, np.sqrt(2.0 / fan_in), shape)
  elif leaf == "bn_scale":
    x = rng.uniform(0.7, 1.3, shape)
  elif leaf == "bn_var":
    x = rng.uniform(0.5, 1.5, shape)
  else:  # BN bias and mean, fc bias.
    x = rng.normal(0, 0.2, shape)
  return x.astype(np.float32)


def random_inception_params(seed: int) -> dict:
  """FID Inception Flax params of random weights (HWIO kernels: fan-in is all but the last axis)."""
  from flax import traverse_util

  rng = np.random.default_rng(seed)
  flat = {}
  for path, shape in inception.param_shapes().items():
    leaf = path.rsplit("/", 1)[1]
    flat[path] = _random_inception_leaf(rng, leaf, shape, int(np.prod(shape[:-1])))
  return traverse_util.unflatten_dict(flat, sep="/")


def random_inception_state(seed=0) -> dict:
  """A pytorch-fid state dict of random weights (OIHW kernels: fan-in is all but the first axis)."""
  import torch  # Only the tests that compare against PyTorch have it (they skip without).

  rng = np.random.default_rng(seed)
  state = {}
  for path, shape in inception.param_shapes().items():
    name = inception.torch_name(path)
    tshape = convert.to_torch(path, np.empty(shape, np.uint8)).shape
    leaf = path.rsplit("/", 1)[1]
    x = _random_inception_leaf(rng, leaf, tshape, int(np.prod(tshape[1:])))
    state[name] = torch.from_numpy(x)
    if leaf == "bn_var":
      state[name.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
  return state
