"""`python -m npp_jax.main --mode=evaluate`: FID, sFID, IS, precision and recall of a batch of samples.

  python -m npp_jax.main --mode=evaluate --config=configs/b.py --workdir=DIR \
      --config.evaluate.samples=DIR/samples/samples_50000.npz \
      --config.evaluate.reference=VIRTUAL_imagenet256_labeled.npz \
      --config.evaluate.inception=pt_inception-2015-12-05-6726825d.pth

Samples are an ADM-format npz (`arr_0`: uint8 [N, H, W, 3], what --mode=sample writes). The reference is
  * an ADM reference batch (`arr_0` images, and usually `mu`, `sigma`, `mu_s`, `sigma_s`: as the ADM
    evaluator does, the file's statistics are used for FID / sFID and its images' features for precision
    and recall),
  * a statistics file this mode wrote (`sample_stats.npz`, `reference_stats.npz`), or
  * a data set (`open_images`: "digits", a TFDS name or directory, an image folder), centre-cropped to
    evaluate.image_size as ADM made its reference batches; its statistics are cached in
    WORKDIR/reference_stats.npz and serve as a reference later.
Features are computed over all devices in global batches of evaluate.batch_size, one shard file per batch
under WORKDIR/evaluate/, so a killed run resumes. Outputs: WORKDIR/metrics.json, WORKDIR/sample_stats.npz
(mu, sigma, mu_s, sigma_s, and the pool3 features for precision and recall) and TensorBoard scalars.
"""
import dataclasses
import functools
import hashlib
import json
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from npp_jax import files
from npp_jax import metrics
from npp_jax import sharding
from npp_jax import validate
from npp_jax.models import inception

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


def min_images(e) -> int:
  """Fewest images a set may have: precision and recall need more than k neighbours."""
  return int(e.neighbours) + 1


# ---------------------------------------------------------------------------------------------------------
# Image sets: an ADM npz read in slices, or a data set centre-cropped to one size.


def _npz_members(path: epath.Path, field: str) -> list[str]:
  try:
    with path.open("rb") as f, zipfile.ZipFile(f) as zf:
      return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
  except (zipfile.BadZipFile, OSError) as e:
    raise ValueError(f"{field}={str(path)!r} is not a readable .npz ({type(e).__name__}); expected an "
                     "npz written by np.savez") from None


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
  version = np.lib.format.read_magic(f)
  read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
  shape, fortran, dtype = read(f)
  if fortran:
    raise ValueError("Fortran-ordered arrays are not supported")
  return shape, dtype


@dataclasses.dataclass(frozen=True)
class NpzImages:
  """`arr_0` of an npz, uint8 [N, H, W, 3], read a slice at a time (50,000 images are 10 GB)."""
  path: epath.Path
  shape: tuple[int, ...]

  @property
  def num(self) -> int:
    return self.shape[0]

  def read(self, start: int, stop: int) -> np.ndarray:
    row = int(np.prod(self.shape[1:]))
    with self.path.open("rb") as f, zipfile.ZipFile(f) as zf, zf.open("arr_0.npy") as member:
      _npy_header(member)
      member.seek(member.tell() + start * row)  # Cheap for np.savez's stored (uncompressed) members.
      data = member.read((stop - start) * row)
    return np.frombuffer(data, np.uint8).reshape(stop - start, *self.shape[1:])


def open_npz_images(path: epath.Path, field: str) -> NpzImages:
  """The checked `arr_0` of an ADM npz: one-line errors for anything but uint8 [N, H, W, 3]."""
  with path.open("rb") as f, zipfile.ZipFile(f) as zf, zf.open("arr_0.npy") as member:
    shape, dtype = _npy_header(member)
  if dtype != np.uint8:
    raise ValueError(f"{field}={str(path)!r}: arr_0 holds {dtype} pixels; expected uint8 [N, H, W, 3] "
                     "(the ADM sample format)")
  if len(shape) != 4 or shape[-1] != 3:
    raise ValueError(f"{field}={str(path)!r}: arr_0 has shape {list(shape)}; expected uint8 [N, H, W, 3] "
                     "(RGB images, the ADM sample format)")
  return NpzImages(path, tuple(int(s) for s in shape))


class DatasetImages:
  """The first `num` images of a data set split, centre-cropped (ADM's centre_crop_arr) to `size`."""

  def __init__(self, source, num: int, size: int):
    self.source, self.num, self.size = source, num, size
    self.shape = (num, size, size, 3)

  def read(self, start: int, stop: int) -> np.ndarray:
    from npp_jax import images as images_lib  # ADM's crop; imported only for data sets.

    images, _ = self.source.read(start, stop)
    return np.stack([images_lib.center_crop_arr(images_lib.to_rgb(im), self.size) for im in images])


# ---------------------------------------------------------------------------------------------------------
# The Inception weights.


def _missing_weights(value: str, what: str) -> ValueError:
  return ValueError(f"evaluate.inception={value!r} {what}; expected pytorch-fid's {inception.WEIGHTS_FILE} "
                    f"(from {inception.WEIGHTS_URL}) or the params directory this mode converted it into "
                    "(WORKDIR/inception)")


def load_inception(value: str) -> tuple[dict, bool]:
  """(params, converted) from pytorch-fid's .pth file (converted=True) or a params directory."""
  from npp_jax import checkpoints
  from npp_jax import convert

  if not value:
    raise _missing_weights(value, "is empty")
  path = epath.Path(value)
  if not path.exists():
    raise _missing_weights(value, "does not exist")
  if path.is_dir():
    params = checkpoints.read_params(path)
    inception.check_params(params, f"evaluate.inception={value!r}")
    return params, False
  state = convert.load_torch_state(str(path))
  return inception.state_to_params(state, what=f"the weights in {value}"), True


def _fingerprint(params) -> str:
  """Identifies the weights cached features were computed with (a changed file gives new features)."""
  return f"{float(np.abs(np.asarray(params['fc']['kernel'], np.float64)).sum()):.12g}"


# ---------------------------------------------------------------------------------------------------------
# Features, sharded over all devices and resumable per shard.


def _digest(settings: dict) -> str:
  return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=8)
def _feature_fn(mesh, recipe: str, size: int):
  def fn(params, images):
    out = inception.features(params, images, recipe=recipe, size=size)
    return out["pool3"], out["spatial"]

  batch = sharding.data_sharding(mesh)
  return jax.jit(fn, in_shardings=(sharding.replicated(mesh), batch), out_shardings=(batch, batch))


def batch_features(fn, params, mesh, read, a: int, b: int, batch_size: int, shape) -> tuple[np.ndarray, ...]:
  """(pool3, spatial) of images [a, b) (b - a <= batch_size), read(start, stop) -> uint8 rows; every
  process reads only its own rows of the global batch, padded with zeros past b."""
  per_process = batch_size // jax.process_count()
  lo = a + jax.process_index() * per_process
  local = np.zeros((per_process, *shape), np.uint8)
  if lo < b:
    local[:min(b, lo + per_process) - lo] = read(lo, min(b, lo + per_process))
  batch = sharding.global_batch({"x": local}, mesh)["x"]
  return tuple(sharding.gather(x)[:b - a] for x in fn(params, batch))


def compute_features(images, params, mesh, e, cache_dir: epath.Path, settings: dict,
                     desc: str) -> tuple[np.ndarray, np.ndarray]:
  """(pool3 [N, 2048], spatial [N, S]) of every image, one cached shard file per global batch."""
  from tqdm import tqdm

  # One folder per set of inputs and settings: a workdir scores other samples or references side by side.
  cache_dir = cache_dir.parent / f"{cache_dir.name}-{_digest(settings)}"
  bs, n = int(e.batch_size), images.num
  spans = [(a, min(a + bs, n)) for a in range(0, n, bs)]
  width = len(str(n))
  paths = [cache_dir / f"shard_{a:0{width}d}-{b:0{width}d}.npz" for a, b in spans]
  files.check_same_settings(str(cache_dir / "meta.json"), settings, str(cache_dir), "features",
                            "expected the same inputs and settings, or another --workdir")
  is_main = jax.process_index() == 0
  if is_main:
    cache_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(str(cache_dir / "meta.json"), settings)
  todo = [i for i, p in enumerate(paths) if not p.exists()]
  done = n - sum(spans[i][1] - spans[i][0] for i in todo)
  if done:
    logging.info("Resuming: features of %d of %d %s images already in %s.", done, n, desc, cache_dir)
  fn = _feature_fn(mesh, e.preprocess, int(e.resize_to))
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
    multihost_utils.sync_global_devices("npp_jax.evaluate.compute_features")
  pool3, spatial = [], []
  for p in paths:
    with p.open("rb") as f, np.load(f) as z:
      pool3.append(z["pool3"])
      spatial.append(z["spatial"])
  return np.concatenate(pool3), np.concatenate(spatial)


# ---------------------------------------------------------------------------------------------------------
# The reference.


@dataclasses.dataclass
class Reference:
  """What the reference gives: images to compute features from, and/or statistics read from a file."""
  name: str
  images: Any = None  # NpzImages or DatasetImages.
  stats: dict | None = None  # mu, sigma and (if the file has them) mu_s, sigma_s.
  pool3: np.ndarray | None = None  # Features for precision and recall (a statistics file of ours).
  from_dataset: bool = False


def _check_recipe(z, members, path, e) -> None:
  """Statistics files of ours record how they were made; refuse one made with other preprocessing."""
  for key, want in (("preprocess", str(e.preprocess)), ("resize_to", int(e.resize_to))):
    if key in members:
      got = type(want)(z[key])
      if got != want:
        raise ValueError(f"evaluate.reference={str(path)!r} was computed with {key}={got!r}; expected "
                         f"evaluate.{key}={want!r} (statistics of other inputs are not comparable)")


def open_reference(e) -> Reference:
  field = "evaluate.reference"
  if not e.reference:
    raise ValueError(f"{field} is empty; expected an ADM reference npz, a statistics npz written by "
                     "--mode=evaluate, or a data set ('digits', a TFDS name or directory, an image folder)")
  path = epath.Path(e.reference)
  if path.is_file() or e.reference.endswith(".npz"):
    if not path.exists():
      raise ValueError(f"{field}={e.reference!r} does not exist; expected an npz file or a data set")
    members = _npz_members(path, field)
    has_stats = "mu" in members and "sigma" in members
    if "arr_0" not in members and not has_stats:
      raise ValueError(f"{field}={e.reference!r} holds neither arr_0 images nor mu/sigma statistics (its "
                       f"arrays: {sorted(members)}); expected an ADM reference batch or a statistics file")
    ref = Reference(e.reference)
    if "arr_0" in members:
      ref.images = open_npz_images(path, field)
    if has_stats:
      with path.open("rb") as f, np.load(f) as z:
        _check_recipe(z, members, path, e)
        ref.stats = {k: np.asarray(z[k], np.float64) for k in STATS_KEYS if k in members}
        if ref.images is None and "pool3" in members:
          ref.pool3 = np.asarray(z["pool3"], np.float32)
    return ref
  from npp_jax import images

  source = images.open_images(e.reference, e.reference_split, e.data_dir, field)
  n = min(validate.positive_int(e.reference_num_images, "evaluate.reference_num_images"),
          source.num_examples)
  return Reference(e.reference, images=DatasetImages(source, n, int(e.image_size)), from_dataset=True)


# ---------------------------------------------------------------------------------------------------------
# The job.


def _check_config(config) -> None:
  e = config.evaluate
  if e.preprocess not in inception.PREPROCESS:
    raise ValueError(f"evaluate.preprocess={e.preprocess!r}; expected one of {inception.PREPROCESS}")
  if e.fid_method not in metrics.FID_METHODS:
    raise ValueError(f"evaluate.fid_method={e.fid_method!r}; expected one of {metrics.FID_METHODS}")
  for name in ("batch_size", "neighbours", "is_split_size", "distance_block", "image_size"):
    validate.positive_int(e[name], f"evaluate.{name}")
  if isinstance(e.resize_to, bool) or not isinstance(e.resize_to, int) or e.resize_to < 75:
    raise ValueError(f"evaluate.resize_to={e.resize_to!r}; expected an integer >= 75 (Inception-v3's "
                     "smallest input; 299 gives the published features)")
  if isinstance(e.num_samples, bool) or not isinstance(e.num_samples, int) or e.num_samples < 0:
    raise ValueError(f"evaluate.num_samples={e.num_samples!r}; expected 0 (all) or a positive integer")
  sharding.check_batch(int(e.batch_size), config.mesh, "evaluate.batch_size")


def open_samples(e) -> NpzImages:
  field = "evaluate.samples"
  if not e.samples:
    raise ValueError(f"{field} is empty; expected an npz of uint8 images arr_0 [N, H, W, 3] (what "
                     "--mode=sample writes to WORKDIR/samples/samples_N.npz)")
  path = epath.Path(e.samples)
  if not path.is_file():
    raise ValueError(f"{field}={e.samples!r} does not exist; expected an npz of uint8 images arr_0")
  members = _npz_members(path, field)
  if "arr_0" not in members:
    raise ValueError(f"{field}={e.samples!r} has no arr_0 (its arrays: {sorted(members)}); expected the "
                     "ADM sample format, arr_0: uint8 [N, H, W, 3]")
  images = open_npz_images(path, field)
  if e.num_samples:
    if e.num_samples > images.num:
      raise ValueError(f"evaluate.num_samples={e.num_samples} but {e.samples} holds {images.num} images; "
                       "expected at most that many (0 takes all)")
    images = dataclasses.replace(images, shape=(int(e.num_samples), *images.shape[1:]))
  return images


def _check_count(images, what: str, e) -> None:
  if images is not None and images.num < min_images(e):
    raise ValueError(f"{what} holds {images.num} images; expected at least {min_images(e)} (precision and "
                     f"recall take each image's {e.neighbours} nearest neighbours in its own set)")


def _stats_file(path: epath.Path, pool3, spatial, e) -> dict:
  mu, sigma = metrics.statistics(pool3)
  mu_s, sigma_s = metrics.statistics(spatial)
  stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
  if jax.process_index() == 0:
    extra = {"pool3": pool3, "preprocess": np.array(e.preprocess), "resize_to": np.array(int(e.resize_to))}
    files.atomic_write(str(path), lambda f: np.savez(f, **stats, **extra))
  return stats


@dataclasses.dataclass
class Inputs:
  """Everything a scoring run reads, checked and loaded (`prepare`) before anything is written."""
  reference: Reference
  params: dict
  converted: bool  # The weights came from the .pth file: save them as WORKDIR/inception.
  samples: NpzImages | None = None


def prepare(config: ml_collections.ConfigDict, *, samples: bool = True) -> Inputs:
  """Checks config.evaluate, opens the reference and loads the weights; samples=False leaves the samples
  to come (--mode=sample scores what it writes: its images are checked here, before any sampling)."""
  e = config.evaluate
  _check_config(config)
  images = None
  if samples:
    images = open_samples(e)
    _check_count(images, f"evaluate.samples={e.samples!r}", e)
  else:
    if not config.sample.vq_checkpoint:
      raise ValueError("evaluate.reference is set but sample.vq_checkpoint is empty: codes only, no images "
                       "to score; expected a VQ checkpoint, or evaluate.reference='' to sample only")
    if config.sample.num_images < min_images(e):
      raise ValueError(f"sample.num_images={config.sample.num_images} with evaluate.reference set; expected "
                       f"at least {min_images(e)} images to score (precision and recall use k = "
                       f"{e.neighbours} neighbours)")
  ref = open_reference(e)
  _check_count(ref.images, f"evaluate.reference={e.reference!r}", e)
  params, converted = load_inception(e.inception)
  return Inputs(ref, params, converted, images)


def evaluate(config: ml_collections.ConfigDict, workdir: str, step: int = 0, *,
             inputs: Inputs | None = None, samples_path: str | None = None) -> dict:
  """Scores config.evaluate.samples against config.evaluate.reference; returns the metrics.json dict.

  Every input is checked (and the weights loaded) before anything is written or compiled. `step` is the
  TensorBoard step the numbers are logged at (a training step; 0 for a standalone run). `inputs` from
  `prepare(config, samples=False)` with `samples_path` scores a file written since (the sampling job's).
  """
  e = config.evaluate
  if inputs is None:
    inputs = prepare(config)
  if inputs.samples is None:
    inputs.samples = open_npz_images(epath.Path(samples_path), "the samples")
  samples, ref, params, converted = inputs.samples, inputs.reference, inputs.params, inputs.converted
  mesh = sharding.make_mesh(config.mesh)

  work = epath.Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    work.mkdir(parents=True, exist_ok=True)
    # One process only: orbax's save is collective across processes, and the conversion is a convenience.
    if converted and jax.process_count() == 1 and not (work / "inception").exists():
      from npp_jax import checkpoints
      checkpoints.save_params(work / "inception", params)
      logging.info("Converted %s into %s: pass that directory as evaluate.inception next time.",
                   e.inception, work / "inception")
  common = _common(e, params)
  pool3, spatial = compute_features(
      samples, params, mesh, e, work / "evaluate" / "samples",
      dict(common, source=str(samples.path), num=samples.num), "samples")
  sample_stats = _stats_file(work / "sample_stats.npz", pool3, spatial, e)

  ref_stats, ref_pool3 = reference_statistics(ref, params, mesh, e, work)
  result = _scores(e, params, pool3, sample_stats, ref_stats, ref_pool3)
  result.update(num_samples=samples.num, num_reference=None if ref.images is None else ref.images.num,
                samples=str(samples.path), reference=str(e.reference), preprocess=str(e.preprocess),
                resize_to=int(e.resize_to), fid_method=str(e.fid_method))
  if is_main:
    files.write_json(str(work / "metrics.json"), result)
  _log(result, workdir, step)
  return result


def _common(e, params) -> dict:
  """The settings every cached feature shard depends on."""
  return {"preprocess": str(e.preprocess), "resize_to": int(e.resize_to),
          "batch_size": int(e.batch_size), "weights": _fingerprint(params)}


def reference_statistics(ref: Reference, params, mesh, e, work: epath.Path) -> tuple[dict, Any]:
  """(mu, sigma, mu_s, sigma_s of the reference, its pool3 features or None): the file's statistics, else
  those of its images' features (cached under WORKDIR/evaluate/reference-*; a data set's also written to
  WORKDIR/reference_stats.npz, a reference for later runs)."""
  ref_stats, ref_pool3 = ref.stats or {}, ref.pool3
  if ref.images is not None:
    ref_pool3, ref_spatial = compute_features(
        ref.images, params, mesh, e, work / "evaluate" / "reference",
        dict(_common(e, params), source=ref.name, num=ref.images.num, split=str(e.reference_split),
             image_size=int(e.image_size)), "reference")
    if ref.from_dataset:
      ref_stats = _stats_file(work / "reference_stats.npz", ref_pool3, ref_spatial, e)
    elif "mu" not in ref_stats:
      ref_stats = dict(zip(STATS_KEYS, (*metrics.statistics(ref_pool3), *metrics.statistics(ref_spatial))))
  return ref_stats, ref_pool3


def scores(e, params, pool3, spatial, ref_stats: dict, ref_pool3) -> dict:
  """fid, sfid, inception_score, precision, recall of sample features against the reference's."""
  mu, sigma = metrics.statistics(pool3)
  mu_s, sigma_s = metrics.statistics(spatial)
  return _scores(e, params, pool3, {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s},
                 ref_stats, ref_pool3)


def _scores(e, params, pool3, sample_stats, ref_stats, ref_pool3) -> dict:
  def frechet(suffix):
    if f"mu{suffix}" not in ref_stats:
      logging.warning("The reference has no mu%s/sigma%s: its %s is not computed.", suffix, suffix,
                      "sFID" if suffix else "FID")
      return None
    if ref_stats[f"mu{suffix}"].shape != sample_stats[f"mu{suffix}"].shape:
      raise ValueError(f"evaluate.reference={e.reference!r} has mu{suffix} of shape "
                       f"{ref_stats[f'mu{suffix}'].shape}, the samples {sample_stats[f'mu{suffix}'].shape}; "
                       "expected statistics of the same features (evaluate.resize_to)")
    return metrics.frechet_distance(sample_stats[f"mu{suffix}"], sample_stats[f"sigma{suffix}"],
                                    ref_stats[f"mu{suffix}"], ref_stats[f"sigma{suffix}"],
                                    method=e.fid_method)

  probs = metrics.inception_probs(pool3, np.asarray(params["fc"]["kernel"]))
  out = {"fid": frechet(""), "sfid": frechet("_s"),
         "inception_score": metrics.inception_score(probs, int(e.is_split_size))}
  if ref_pool3 is None:
    logging.warning("The reference holds no pool3 features or images: no precision and recall.")
    out["precision"] = out["recall"] = None
  else:
    out["precision"], out["recall"] = metrics.precision_recall(
        ref_pool3, pool3, k=int(e.neighbours), block=int(e.distance_block))
  return out


def _log(result: dict, workdir: str, step: int) -> None:
  from npp_jax import summaries

  writer = summaries.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  names = ("fid", "sfid", "inception_score", "precision", "recall")
  writer.write_scalars(int(step), {f"eval/{k}": result[k] for k in names if result[k] is not None})
  writer.flush()
  writer.close()
  logging.info("Metrics: %s", json.dumps({k: result[k] for k in names + ("num_samples",)}))
