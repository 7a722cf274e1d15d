"""Inception features of an image set: the FID Inception's weights, and pool3 / spatial features
computed over all devices in global batches, one cached shard file per batch so that a killed run
resumes."""

import functools
import hashlib
import json

from etils import epath
import jax
import numpy as np

from npp_jax import sharding
from npp_jax import shards
from npp_jax.models import inception


def _missing_weights(value: str, what: str) -> ValueError:
  return ValueError(
    f"evaluate.inception={value!r} {what}; expected pytorch-fid's {inception.WEIGHTS_FILE} "
    f"(from {inception.WEIGHTS_URL}) or the params directory this mode converted it into "
    "(WORKDIR/inception)"
  )


def load_inception(value: str) -> tuple[dict, bool]:
  """(params, converted) from pytorch-fid's .pth file (converted=True) or a params directory."""
  from npp_jax import checkpoints

  if not value:
    raise _missing_weights(value, "is empty")
  path = epath.Path(value)
  if not path.exists():
    raise _missing_weights(value, "does not exist")
  if path.is_dir():
    params = checkpoints.read_params(path)
    checkpoints.check_param_shapes(
      params,
      inception.param_shapes(),
      f"evaluate.inception={value!r} does not hold FID Inception-v3 params",
    )
    return params, False
  return checkpoints.load_torch_inception(path, f"the weights in {value}"), True


def fingerprint(params) -> str:
  """Identifies the weights cached features were computed with (a changed file gives new
  features)."""
  return f"{float(np.abs(np.asarray(params['fc']['kernel'], np.float64)).sum()):.12g}"


def _digest(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def feature_fn(mesh, recipe: str, size: int):
  def fn(params, images):
    out = inception.features(params, images, recipe=recipe, size=size)
    return out["pool3"], out["spatial"]

  batch = sharding.data_sharding(mesh)
  return jax.jit(fn, in_shardings=(sharding.replicated(mesh), batch), out_shardings=(batch, batch))


def batch_features(
  fn, params, mesh, read, a: int, b: int, batch_size: int, shape
) -> tuple[np.ndarray, ...]:
  """(pool3, spatial) of images [a, b) (b - a <= batch_size), read(start, stop) -> uint8 rows; every
  process reads only its own rows of the global batch, padded with zeros past b."""
  per_process = batch_size // jax.process_count()
  lo = a + jax.process_index() * per_process
  local = np.zeros((per_process, *shape), np.uint8)
  if lo < b:
    local[: min(b, lo + per_process) - lo] = read(lo, min(b, lo + per_process))
  batch = sharding.global_batch({"x": local}, mesh)["x"]
  return tuple(sharding.gather(x)[: b - a] for x in fn(params, batch))


def compute_features(
  images, params, mesh, e, cache_dir: epath.Path, settings: dict, desc: str
) -> tuple[np.ndarray, np.ndarray]:
  """(pool3 [N, 2048], spatial [N, S]) of every image, on every process, one cached shard file per
  global batch."""
  # One folder per set of inputs and settings: a workdir scores other samples or references side by
  # side.
  cache_dir = cache_dir.parent / f"{cache_dir.name}-{_digest(settings)}"
  bs = int(e.batch_size)
  store = shards.Shards(cache_dir, images.num, bs)
  store.check_settings(
    settings, "features", "expected the same inputs and settings, or another --workdir"
  )
  todo = store.start(settings, f"Resuming: features of %d of %d {desc} images already in %s.")
  fn = feature_fn(mesh, e.preprocess, int(e.resize_to))
  params = jax.device_put(params, sharding.replicated(mesh))

  def computed():
    for i in todo:
      a, b = store.spans[i]
      pool3, spatial = batch_features(fn, params, mesh, images.read, a, b, bs, images.shape[1:])
      yield {"pool3": pool3, "spatial": spatial}

  fresh = store.write(todo, computed(), f"features ({desc})", keep=True)
  store.finish("npp_jax.fid.features.compute_features")
  got = store.read_all(fresh)
  return np.concatenate([s["pool3"] for s in got]), np.concatenate([s["spatial"] for s in got])


def common_settings(e, params) -> dict:
  """The settings every cached feature shard depends on."""
  return {
    "preprocess": str(e.preprocess),
    "resize_to": int(e.resize_to),
    "batch_size": int(e.batch_size),
    "weights": fingerprint(params),
  }
