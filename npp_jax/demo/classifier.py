"""Scoring generated digits: a small CNN trained on the real digits judges class fidelity and
realism.

* accuracy: the fraction of samples the classifier puts in the class they were conditioned on, i.e.
did
  the class-conditional generator draw the digit it was asked for.
* frechet: the Frechet distance between the classifier's penultimate-layer features of the samples
and of
  real held-out digits (FID with a digits classifier in place of Inception), i.e. do the samples
  look like real digits, in their variety too.

The classifier sees one grey channel: RGB inputs are averaged over channels, so it judges what the
VQ decoded regardless of small colour casts. Pixel values are clipped to [-1, 1] first, as they
would be when the samples are saved as images.
"""

import os
import time
from typing import Any, Mapping
import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.linalg

from npp_jax.data import digits

NUM_CLASSES = digits.NUM_CLASSES
IMAGE_SIZE = digits.IMAGE_SIZE
# Penultimate width; small so that the feature covariance is well estimated from a few hundred
# images.
FEATURES = 64
_CHUNK = 500  # Images per forward call at scoring time: bounded memory and one compiled shape.

Params = Mapping[str, Any]


class DigitClassifier(nn.Module):
  """Two conv blocks, a dense feature layer, a linear head. [N, 32, 32, 1] -> (logits, features)."""

  features: int = FEATURES
  widths: tuple[int, ...] = (
    16,
    32,
  )  # Narrow: trains in seconds on 2 CPU cores, still ~98% on the digits.

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    for width in self.widths:
      x = nn.relu(nn.Conv(width, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    # GELU, not ReLU: with ReLU a third or more of the feature units ended up dead (always 0),
    # wasting dimensions of the Frechet distance.
    feats = nn.gelu(nn.Dense(self.features)(x))
    return nn.Dense(NUM_CLASSES)(feats), feats


_MODEL = DigitClassifier()


def _grey(images: Any, name: str = "images") -> np.ndarray:
  """Checks and converts [N, 32, 32, 3|1] images in [-1, 1] to the classifier's float32 [N, 32, 32,
  1]."""
  x = np.asarray(images)
  if (
    x.ndim != 4
    or x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE)
    or x.shape[3] not in (1, 3)
    or not len(x)
  ):
    raise ValueError(
      f"{name} has shape {x.shape}; expected [N>0, {IMAGE_SIZE}, {IMAGE_SIZE}, 3] or "
      f"[N>0, {IMAGE_SIZE}, {IMAGE_SIZE}, 1] in [-1, 1]"
    )
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"{name} has dtype {x.dtype}; expected floating point values in [-1, 1]")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} holds NaN or inf values; expected finite values in [-1, 1]")
  x = x.astype(np.float32).mean(axis=-1, keepdims=True)
  return np.clip(x, -1.0, 1.0)


def _labels(labels: Any, n: int, name: str = "labels") -> np.ndarray:
  y = np.asarray(labels)
  if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
    raise ValueError(
      f"{name} has shape {y.shape} and dtype {y.dtype}; expected integers of shape ({n},)"
    )
  if n and (y.min() < 0 or y.max() >= NUM_CLASSES):
    raise ValueError(
      f"{name} range over [{y.min()}, {y.max()}]; expected classes in [0, {NUM_CLASSES})"
    )
  return y.astype(np.int32)


def _positive_int(value: Any, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r}; expected a positive integer")
  return int(value)


@jax.jit
def _forward(params: Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  return _MODEL.apply({"params": params}, x)


def _forward_all(params: Params, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Forward pass in fixed-size chunks (the last one padded) so any N compiles once and fits
  memory."""
  logits, feats = [], []
  for start in range(0, len(x), _CHUNK):
    chunk = x[start : start + _CHUNK]
    n = len(chunk)
    if n < _CHUNK and len(x) > _CHUNK:
      chunk = np.concatenate([chunk, np.zeros((_CHUNK - n, *chunk.shape[1:]), chunk.dtype)])
    l, f = _forward(params, chunk)
    logits.append(np.asarray(l)[:n])
    feats.append(np.asarray(f)[:n])
  return np.concatenate(logits), np.concatenate(feats)


def classify(params: Params, images: Any) -> np.ndarray:
  """Class logits float32 [N, 10] of images [N, 32, 32, 3|1] in [-1, 1]."""
  return _forward_all(params, _grey(images))[0]


def features(params: Params, images: Any) -> np.ndarray:
  """Penultimate-layer features float32 [N, FEATURES] of images [N, 32, 32, 3|1] in [-1, 1]."""
  return _forward_all(params, _grey(images))[1]


def accuracy(params: Params, images: Any, labels: Any) -> float:
  """Fraction of images whose argmax class is their label."""
  logits = classify(params, images)
  return float(np.mean(logits.argmax(-1) == _labels(labels, len(logits))))


def init_params(seed: int = 0) -> Params:
  x = jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 1), jnp.float32)
  return _MODEL.init(jax.random.PRNGKey(seed), x)["params"]


def _random_shift(key: jax.Array, x: jax.Array, max_shift: int) -> jax.Array:
  """Moves every image by its own random offset of up to max_shift pixels, filling with background.

  Generated digits may sit less well centred than MNIST's; shifts make the scorer judge shape, not
  position.
  """
  if max_shift == 0:
    return x
  n, h, w, _ = x.shape
  m = max_shift
  padded = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(key, (n, 2), 0, 2 * max_shift + 1)
  crop = lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, img.shape[-1]))
  return jax.vmap(crop)(padded, offsets)


def train_classifier(
  images: Any,
  labels: Any,
  test_images: Any,
  test_labels: Any,
  *,
  seed: int = 0,
  epochs: int = 6,
  batch_size: int = 32,
  learning_rate: float = 2e-3,
  max_shift: int = 2,
) -> tuple[Params, float]:
  """Trains the classifier with Adam on (images, labels); returns (params, accuracy on the test
  set).

  The defaults (6 epochs of batch 32 over the 4500 training digits, random shifts of up to 2 pixels)
  take 8-15 s on 2 (shared) CPU cores and reach ~97-98% test accuracy. Initialisation, shuffling and
  shifts are fixed by `seed`.
  """
  x, x_test = _grey(images), _grey(test_images, "test_images")
  y, y_test = _labels(labels, len(x)), _labels(test_labels, len(x_test), "test_labels")
  epochs, batch_size = _positive_int(epochs, "epochs"), _positive_int(batch_size, "batch_size")
  if batch_size > len(x):
    raise ValueError(f"batch_size={batch_size}; expected at most the {len(x)} training images")
  if (
    isinstance(max_shift, bool)
    or not isinstance(max_shift, (int, np.integer))
    or not 0 <= max_shift < 8
  ):
    raise ValueError(f"max_shift={max_shift!r}; expected an integer number of pixels in [0, 8)")
  max_shift = int(max_shift)
  if not learning_rate > 0:
    raise ValueError(f"learning_rate={learning_rate!r}; expected a positive number")

  steps_per_epoch = len(x) // batch_size  # Drop the ragged last batch: one compiled step shape.
  total = epochs * steps_per_epoch
  # A short warm-up: without it Adam's first large steps left many ReLU units dead for good.
  schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, total // 10), total)
  tx = optax.adam(schedule)
  params = init_params(seed)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, xb, yb, key):
    xb = _random_shift(key, xb, max_shift)

    def loss_fn(p):
      logits, _ = _MODEL.apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  rng = np.random.default_rng(seed)
  key = jax.random.PRNGKey(seed + 1)
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for i in range(steps_per_epoch):
      idx = order[i * batch_size : (i + 1) * batch_size]
      key, sub = jax.random.split(key)
      params, opt_state, loss = step(params, opt_state, x[idx], y[idx], sub)
    if not np.isfinite(float(loss)):
      raise FloatingPointError(
        f"classifier loss became {float(loss)}; lower learning_rate={learning_rate}"
      )
  params = jax.device_get(params)
  return params, accuracy(params, x_test, y_test)


def save_classifier(path: str, params: Params) -> None:
  """Writes params as msgpack (flax.serialization); the file is replaced atomically."""
  data = flax.serialization.msgpack_serialize(jax.device_get(flax.core.unfreeze(params)))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def load_classifier(path: str) -> Params:
  """Reads params written by `save_classifier`; a file for another architecture is a ValueError."""
  with open(path, "rb") as f:
    params = flax.serialization.msgpack_restore(f.read())
  expected = jax.eval_shape(init_params)
  got = jax.tree_util.tree_map(
    lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), params
  )
  if jax.tree_util.tree_structure(got) != jax.tree_util.tree_structure(expected) or got != expected:
    raise ValueError(
      f"{path} holds params that do not fit DigitClassifier(features={FEATURES}); "
      "expected a file written by save_classifier for this version (delete it to retrain)"
    )
  return params


def load_or_train_classifier(
  path: str | None,
  *,
  seed: int = 0,
  epochs: int = 6,
  batch_size: int = 32,
  learning_rate: float = 2e-3,
  log=print,
) -> tuple[Params, float]:
  """The demo's scorer: loads it from `path` if there, else trains on the digits and saves it there.

  Returns (params, accuracy on the digits test split), the accuracy recomputed after a load.
  """
  test_images, test_labels = digits.load_digits("test")
  if path and os.path.exists(path):
    params = load_classifier(path)
    acc = accuracy(params, test_images, test_labels)
    log(f"scorer: loaded {path}, test accuracy {acc:.4f}")
    return params, acc
  t0 = time.perf_counter()
  params, acc = train_classifier(
    *digits.load_digits("train"),
    test_images,
    test_labels,
    seed=seed,
    epochs=epochs,
    batch_size=batch_size,
    learning_rate=learning_rate,
  )
  log(f"scorer: trained in {time.perf_counter() - t0:.1f}s, test accuracy {acc:.4f}")
  if path:
    save_classifier(path, params)
  return params, acc


def frechet_distance(feats_a: Any, feats_b: Any) -> float:
  """|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)) of two feature sets [N_a, F] and [N_b,
  F]."""
  a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
  if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
    raise ValueError(
      f"feature sets of shapes {a.shape} and {b.shape}; expected [N>=2, F] both with the same F"
    )
  if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
    raise ValueError("feature sets hold NaN or inf values; expected finite features")
  mu_a, mu_b = a.mean(0), b.mean(0)
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  with warnings.catch_warnings():
    # A singular product (fewer samples than features) is expected; the check below handles its
    # fallout.
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(s_a @ s_b)
  if not np.all(np.isfinite(covmean)):
    # Singular product (fewer samples than features): nudge both covariances, as pytorch-fid does.
    offset = np.eye(a.shape[1]) * 1e-6
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
      covmean = scipy.linalg.sqrtm((s_a + offset) @ (s_b + offset))
  diff = mu_a - mu_b
  return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(np.real(covmean)))


def score_samples(
  params: Params, images: Any, labels: Any, reference_images: Any
) -> dict[str, float]:
  """{"accuracy": fraction of samples classified as their conditioning label, "frechet": Frechet
  distance between the features of the samples and of `reference_images` (the digits test split in
  the demo)}."""
  x = _grey(images)
  y = _labels(labels, len(x))
  logits, feats = _forward_all(params, x)
  ref_feats = features(params, _grey(reference_images, "reference_images"))
  return {
    "accuracy": float(np.mean(logits.argmax(-1) == y)),
    "frechet": frechet_distance(feats, ref_feats),
  }
