"""Trained-or-random artifacts shared by several test files, built fast (tests/ is on sys.path).

random_vq_params: VQ weights of the real class without compiling its init. `VQModel.init` traces
the whole encoder and decoder and XLA then compiles them with every initializer's threefry
expansion: 80 s on 2 cores (Intel Xeon, 2026-12-07) for configs/demo.py:smoke's 200 k parameters,
paid again for every VQ config a test uses. The shapes come from `jax.eval_shape` (no compile) and
the values from NumPy, drawn as Flax's defaults draw them.
"""

import jax
import numpy as np

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
