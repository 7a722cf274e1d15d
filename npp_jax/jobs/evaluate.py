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
import json

from absl import logging
from etils import epath
import jax
import ml_collections

from npp_jax import files
from npp_jax import sharding
from npp_jax import validate
from npp_jax.fid import features
from npp_jax.fid import images as image_sets
from npp_jax.fid import metrics
from npp_jax.fid import scores as fid_scores
from npp_jax.models import inception


def min_images(e) -> int:
  """Fewest images a set may have: precision and recall need more than k neighbours."""
  return int(e.neighbours) + 1


def _check_config(config) -> None:
  e = config.evaluate
  if e.preprocess not in inception.PREPROCESS:
    raise ValueError(
      f"evaluate.preprocess={e.preprocess!r}; expected one of {inception.PREPROCESS}"
    )
  if e.fid_method not in metrics.FID_METHODS:
    raise ValueError(f"evaluate.fid_method={e.fid_method!r}; expected one of {metrics.FID_METHODS}")
  for name in ("batch_size", "neighbours", "is_split_size", "distance_block", "image_size"):
    validate.positive_int(e[name], f"evaluate.{name}")
  if isinstance(e.resize_to, bool) or not isinstance(e.resize_to, int) or e.resize_to < 75:
    raise ValueError(
      f"evaluate.resize_to={e.resize_to!r}; expected an integer >= 75 (Inception-v3's "
      "smallest input; 299 gives the published features)"
    )
  if isinstance(e.num_samples, bool) or not isinstance(e.num_samples, int) or e.num_samples < 0:
    raise ValueError(
      f"evaluate.num_samples={e.num_samples!r}; expected 0 (all) or a positive integer"
    )
  sharding.check_batch(int(e.batch_size), config.mesh, "evaluate.batch_size")


def open_samples(e) -> image_sets.NpzImages:
  field = "evaluate.samples"
  if not e.samples:
    raise ValueError(
      f"{field} is empty; expected an npz of uint8 images arr_0 [N, H, W, 3] (what "
      "--mode=sample writes to WORKDIR/samples/samples_N.npz)"
    )
  path = epath.Path(e.samples)
  if not path.is_file():
    raise ValueError(f"{field}={e.samples!r} does not exist; expected an npz of uint8 images arr_0")
  members = image_sets.npz_members(path, field)
  if "arr_0" not in members:
    raise ValueError(
      f"{field}={e.samples!r} has no arr_0 (its arrays: {sorted(members)}); expected the "
      "ADM sample format, arr_0: uint8 [N, H, W, 3]"
    )
  images = image_sets.open_npz_images(path, field)
  if e.num_samples:
    if e.num_samples > images.num:
      raise ValueError(
        f"evaluate.num_samples={e.num_samples} but {e.samples} holds {images.num} images; "
        "expected at most that many (0 takes all)"
      )
    images = dataclasses.replace(images, shape=(int(e.num_samples), *images.shape[1:]))
  return images


def _check_count(images, what: str, e) -> None:
  if images is not None and images.num < min_images(e):
    raise ValueError(
      f"{what} holds {images.num} images; expected at least {min_images(e)} (precision and "
      f"recall take each image's {e.neighbours} nearest neighbours in its own set)"
    )


@dataclasses.dataclass
class Inputs:
  """Everything a scoring run reads, checked and loaded (`prepare`) before anything is written."""

  reference: fid_scores.Reference
  params: dict
  converted: bool  # The weights came from the .pth file: save them as WORKDIR/inception.
  samples: image_sets.NpzImages | None = None


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
      raise ValueError(
        "evaluate.reference is set but sample.vq_checkpoint is empty: codes only, no images "
        "to score; expected a VQ checkpoint, or evaluate.reference='' to sample only"
      )
    if config.sample.num_images < min_images(e):
      raise ValueError(
        f"sample.num_images={config.sample.num_images} with evaluate.reference set; expected "
        f"at least {min_images(e)} images to score (precision and recall use k = "
        f"{e.neighbours} neighbours)"
      )
  ref = fid_scores.open_reference(e)
  _check_count(ref.images, f"evaluate.reference={e.reference!r}", e)
  params, converted = features.load_inception(e.inception)
  return Inputs(ref, params, converted, images)


def evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  step: int = 0,
  *,
  inputs: Inputs | None = None,
  samples_path: str | None = None,
) -> dict:
  """Scores config.evaluate.samples against config.evaluate.reference; returns the metrics.json dict.

  Every input is checked (and the weights loaded) before anything is written or compiled. `step` is the
  TensorBoard step the numbers are logged at (a training step; 0 for a standalone run). `inputs` from
  `prepare(config, samples=False)` with `samples_path` scores a file written since (the sampling job's).
  """
  e = config.evaluate
  if inputs is None:
    inputs = prepare(config)
  if inputs.samples is None:
    inputs.samples = image_sets.open_npz_images(epath.Path(samples_path), "the samples")
  samples, ref, params, converted = (
    inputs.samples,
    inputs.reference,
    inputs.params,
    inputs.converted,
  )
  mesh = sharding.make_mesh(config.mesh)

  work = epath.Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    work.mkdir(parents=True, exist_ok=True)
    # One process only: orbax's save is collective across processes, and the conversion is a convenience.
    if converted and jax.process_count() == 1 and not (work / "inception").exists():
      from npp_jax import checkpoints

      checkpoints.save_params(work / "inception", params)
      logging.info(
        "Converted %s into %s: pass that directory as evaluate.inception next time.",
        e.inception,
        work / "inception",
      )
  common = features.common_settings(e, params)
  pool3, spatial = features.compute_features(
    samples,
    params,
    mesh,
    e,
    work / "evaluate" / "samples",
    dict(common, source=str(samples.path), num=samples.num),
    "samples",
  )
  sample_stats = fid_scores.write_stats(work / "sample_stats.npz", pool3, spatial, e)

  ref_stats, ref_pool3 = fid_scores.reference_statistics(ref, params, mesh, e, work)
  result = fid_scores.score_stats(e, params, pool3, sample_stats, ref_stats, ref_pool3)
  result.update(
    num_samples=samples.num,
    num_reference=None if ref.images is None else ref.images.num,
    samples=str(samples.path),
    reference=str(e.reference),
    preprocess=str(e.preprocess),
    resize_to=int(e.resize_to),
    fid_method=str(e.fid_method),
  )
  if is_main:
    files.write_json(str(work / "metrics.json"), result)
  _log(result, workdir, step)
  return result


def _log(result: dict, workdir: str, step: int) -> None:
  from npp_jax import summaries

  writer = summaries.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  names = ("fid", "sfid", "inception_score", "precision", "recall")
  writer.write_scalars(int(step), {f"eval/{k}": result[k] for k in names if result[k] is not None})
  writer.flush()
  writer.close()
  logging.info("Metrics: %s", json.dumps({k: result[k] for k in names + ("num_samples",)}))
