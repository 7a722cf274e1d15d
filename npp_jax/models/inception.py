"""The FID Inception-v3: the network behind FID, sFID, IS, precision and recall (Flax Linen, NHWC).

This is the 2015-12-05 TensorFlow Inception graph that the ADM evaluator (and TTUR's FID before it)
runs, in the form pytorch-fid ported it: torchvision's Inception-v3 layout with 1008 classes and the
graph's quirks kept, i.e. average pools that ignore padding (count_include_pad=False) in the A, C
and first E blocks, a max pool in the last E block, and batch norms with eps 1e-3. Weights come from
pytorch-fid's release file `pt_inception-2015-12-05-6726825d.pth`
(`convert.inception_state_to_params`).

Outputs per image:
  pool3   [2048]      the global average pool: FID, precision and recall.
  spatial [17*17*7]   the first 7 channels of Mixed_6d's 1x1 branch (the TF graph's `mixed_6/conv`),
  in
                      the TF graph's H, W, C order, flattened: sFID, as the ADM evaluator takes
                      them.
  logits  [1008]      fc(pool3) with its bias (pytorch-fid's fc). IS uses pool3 @ W without the
  bias, as
                      the ADM evaluator does (npp_jax.fid.metrics.inception_probs).

Preprocessing (`preprocess`): uint8 [N, H, W, 3] -> float [N, 299, 299, 3]; two recipes:
  "adm":         what the TF graph does to the ADM evaluator's input: TF1's ResizeBilinear
  (align_corners
                 False, no half-pixel centres: source = dest * in / out) and (x - 128) / 128.
  "pytorch_fid": pytorch-fid's: F.interpolate(bilinear, align_corners=False), i.e. half-pixel
  centres,
                 and 2 * x / 255 - 1.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGE_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
BN_EPS = 1e-3
PREPROCESS = ("adm", "pytorch_fid")
WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = (
  "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILE
)


class BasicConv(nn.Module):
  """Conv (no bias) -> inference batch norm (running statistics as parameters) -> ReLU."""

  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    (ph, pw) = self.padding
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=self.strides,
      padding=((ph, ph), (pw, pw)),
      use_bias=False,
      dtype=self.dtype,
      name="conv",
    )(x)
    shape = (self.features,)
    scale = self.param("bn_scale", nn.initializers.ones, shape)
    bias = self.param("bn_bias", nn.initializers.zeros, shape)
    mean = self.param("bn_mean", nn.initializers.zeros, shape)
    var = self.param("bn_var", nn.initializers.ones, shape)
    mul = scale * jax.lax.rsqrt(var + BN_EPS)
    return nn.relu(x * mul.astype(x.dtype) + (bias - mean * mul).astype(x.dtype))


def _avg_pool(x):  # TF's average pool: padded zeros are not counted.
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class BlockA(nn.Module):  # Mixed_5b/c/d (FIDInceptionA).
  pool_features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv, dtype=self.dtype)
    b1 = c(64, (1, 1), name="branch1x1")(x)
    b5 = c(64, (5, 5), padding=(2, 2), name="branch5x5_2")(c(48, (1, 1), name="branch5x5_1")(x))
    b3 = c(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = c(self.pool_features, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class BlockB(nn.Module):  # Mixed_6a.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv, dtype=self.dtype)
    b3 = c(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = c(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = c(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = c(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_s2(x)], axis=-1)


class BlockC(
  nn.Module
):  # Mixed_6b..e (FIDInceptionC); returns the 1x1 branch too (sFID's features).
  channels_7x7: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv, dtype=self.dtype)
    c7 = self.channels_7x7
    b1 = c(192, (1, 1), name="branch1x1")(x)
    b7 = c(c7, (1, 1), name="branch7x7_1")(x)
    b7 = c(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = c(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = c(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = c(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = c(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = c(192, (1, 1), name="branch_pool")(_avg_pool(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class BlockD(nn.Module):  # Mixed_7a.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv, dtype=self.dtype)
    b3 = c(320, (3, 3), strides=2, name="branch3x3_2")(c(192, (1, 1), name="branch3x3_1")(x))
    b7 = c(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = c(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = c(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = c(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_s2(x)], axis=-1)


class BlockE(nn.Module):  # Mixed_7b (FIDInceptionE_1, average pool), Mixed_7c (E_2, max pool).
  max_pool: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv, dtype=self.dtype)
    b1 = c(320, (1, 1), name="branch1x1")(x)
    b3 = c(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate(
      [
        c(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        c(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
      ],
      axis=-1,
    )
    bd = c(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = c(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate(
      [
        c(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        c(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
      ],
      axis=-1,
    )
    if self.max_pool:  # The 2015 graph's quirk that pytorch-fid keeps.
      pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool(x)
    bp = c(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInception(nn.Module):
  """Preprocessed images float [N, H, W, 3] (299 px for the published features) -> outputs dict."""

  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = functools.partial(BasicConv, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = c(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = c(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = c(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max_pool_s2(x)
    x = c(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = c(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_s2(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = BlockA(pool_features, dtype=self.dtype, name=name)(x)
    x = BlockB(dtype=self.dtype, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x, branch1x1 = BlockC(c7, dtype=self.dtype, name=name)(x)
      if name == "Mixed_6d":
        spatial = branch1x1[..., :SPATIAL_CHANNELS]
    x = BlockD(dtype=self.dtype, name="Mixed_7a")(x)
    x = BlockE(max_pool=False, dtype=self.dtype, name="Mixed_7b")(x)
    x = BlockE(max_pool=True, dtype=self.dtype, name="Mixed_7c")(x)
    pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, dtype=jnp.float32, name="fc")(pool3)
    return {
      "pool3": pool3,
      "spatial": spatial.astype(jnp.float32).reshape(spatial.shape[0], -1),
      "logits": logits,
    }


# --------------------------------------------------------------------------------------------------
# Preprocessing.


def _tf1_resize_axis(x, axis: int, out: int):
  """TF1 ResizeBilinear along one axis: source = dest * in / out, the next pixel clamped at the
  edge."""
  n = x.shape[axis]
  # In float32, as TF computes the scale and the source positions: float64 here moves pixels by
  # ~1e-3.
  src = np.arange(out, dtype=np.float32) * (np.float32(n) / np.float32(out))
  lo = np.floor(src).astype(np.int32)
  hi = np.minimum(lo + 1, n - 1)
  frac = (src - lo).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  a, b = jnp.take(x, lo, axis=axis), jnp.take(x, hi, axis=axis)
  return a + (b - a) * frac


def preprocess(images, recipe: str = "adm", size: int = IMAGE_SIZE):
  """uint8 (or float in [0, 255]) images [N, H, W, 3] -> the network's float32 input [N, size, size,
  3]."""
  if recipe not in PREPROCESS:
    raise ValueError(f"preprocess recipe {recipe!r}; expected one of {PREPROCESS}")
  x = jnp.asarray(images).astype(jnp.float32)
  n, h, w, ch = x.shape
  if recipe == "adm":
    if (h, w) != (size, size):
      x = _tf1_resize_axis(_tf1_resize_axis(x, 2, size), 1, size)  # Columns first, as TF.
    return (x - 128.0) / 128.0
  x = x / 255.0
  if (h, w) != (size, size):
    # Half-pixel centres without antialiasing: torch's F.interpolate(bilinear, align_corners=False).
    x = jax.image.resize(x, (n, size, size, ch), "bilinear", antialias=False)
  return 2.0 * x - 1.0


def features(params, images, *, recipe: str = "adm", size: int = IMAGE_SIZE, dtype=jnp.float32):
  """uint8 images [N, H, W, 3] -> {"pool3", "spatial", "logits"} (float32); jit it (or use
  `feature_fn`)."""
  return FIDInception(dtype=dtype).apply({"params": params}, preprocess(images, recipe, size))


# --------------------------------------------------------------------------------------------------
# Weights: pytorch-fid's state dict <-> params.


@functools.lru_cache(maxsize=1)
def param_shapes() -> dict[str, tuple[int, ...]]:
  """{flax path "Mixed_5b/branch1x1/conv/kernel": shape} of the whole network."""
  abstract = jax.eval_shape(
    lambda: FIDInception().init(jax.random.key(0), jnp.zeros((1, 75, 75, 3), jnp.float32))
  )
  flat = jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
  return {"/".join(k.key for k in path): tuple(x.shape) for path, x in flat}


_BN_NAMES = {
  "bn_scale": "bn.weight",
  "bn_bias": "bn.bias",
  "bn_mean": "bn.running_mean",
  "bn_var": "bn.running_var",
}


def torch_name(path: str) -> str:
  """Flax path -> pytorch-fid (torchvision Inception3) key: .../conv/kernel -> ....conv.weight."""
  *modules, leaf = path.split("/")
  if leaf in _BN_NAMES:
    return ".".join(modules + [_BN_NAMES[leaf]])
  return ".".join(modules + ["bias" if leaf == "bias" else "weight"])
