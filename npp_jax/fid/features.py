"""Inception features of an image set: the FID Inception's weights, and pool3 / spatial features computed
over all devices in global batches, one cached shard file per batch so that a killed run resumes."""

import functools
import hashlib
import json

from absl import logging
from etils import epath
import jax
import numpy as np

from npp_jax import files
from npp_jax import sharding
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
  """Identifies the weights cached features were computed with (a changed file gives new features)."""
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
  """(pool3 [N, 2048], spatial [N, S]) of every image, one cached shard file per global batch."""
  from tqdm import tqdm

  # One folder per set of inputs and settings: a workdir scores other samples or references side by side.
  cache_dir = cache_dir.parent / f"{cache_dir.name}-{_digest(settings)}"
  bs, n = int(e.batch_size), images.num
  spans = [(a, min(a + bs, n)) for a in range(0, n, bs)]
  width = len(str(n))
  paths = [cache_dir / f"shard_{a:0{width}d}-{b:0{width}d}.npz" for a, b in spans]
  files.check_same_settings(
    str(cache_dir / "meta.json"),
    settings,
    str(cache_dir),
    "features",
    "expected the same inputs and settings, or another --workdir",
  )
  is_main = jax.process_index() == 0
  if is_main:
    cache_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(str(cache_dir / "meta.json"), settings)
  todo = [i for i, p in enumerate(paths) if not p.exists()]
  done = n - sum(spans[i][1] - spans[i][0] for i in todo)
  if done:
    logging.info(
      "Resuming: features of %d of %d %s images already in %s.", done, n, desc, cache_dir
    )
  fn = feature_fn(mesh, e.preprocess, int(e.resize_to))
  params = jax.device_put(params, sharding.replicated(mesh))
  bar = tqdm(total=n, initial=done, unit="img", desc=f"features ({desc})", disable=not is_main)
  for i in todo:
    a, b = spans[i]
    pool3, spatial = batch_features(fn, params, mesh, images.read, a, b, bs, images.shape[1:])
    if is_main:
      files.atomic_write(str(paths[i]), lambda f: np.savez(f, pool3=pool3, spatial=spatial))
    bar.update(b - a)
  bar.close()
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("npp_jax.fid.features.compute_features")
  pool3, spatial = [], []
  for p in paths:
    with p.open("rb") as f, np.load(f) as z:
      pool3.append(z["pool3"])
      spatial.append(z["spatial"])
  return np.concatenate(pool3), np.concatenate(spatial)


def common_settings(e, params) -> dict:
  """The settings every cached feature shard depends on."""
  return {
    "preprocess": str(e.preprocess),
    "resize_to": int(e.resize_to),
    "batch_size": int(e.batch_size),
    "weights": fingerprint(params),
  }
