"""Scoring an image set as the ADM evaluator does: its settings (the `evaluate` section's feature
and metric knobs), the reference (an ADM batch, a statistics file, or a data set), and FID, sFID,
Inception Score, precision and recall of the set's features against it. `evaluate` is the whole of
it, used by --mode=evaluate and by --mode=sample with evaluate.reference set."""

import dataclasses
import json
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np

from npp_jax import files
from npp_jax import rules
from npp_jax import summaries
from npp_jax.fid import features
from npp_jax.fid import images as image_sets
from npp_jax.fid import metrics
from npp_jax.models import inception

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
NAMES = ("fid", "sfid", "inception_score", "precision", "recall")


@dataclasses.dataclass(frozen=True)
class ScoreSettings:
  """The `evaluate` section's knobs of scoring itself, shared by every path that scores images
  (--mode=evaluate, --mode=sample with a reference, FID during training)."""

  reference: str  # An ADM reference npz, a statistics npz of ours, or a data set; "" for none.
  reference_split: str
  reference_num_images: int
  data_dir: str
  image_size: int
  inception: str
  preprocess: str
  resize_to: int
  batch_size: int
  fid_method: str
  neighbours: int
  is_split_size: int
  distance_block: int

  def __post_init__(self):
    rules.check_fields(self, "evaluate", _RULES)

  @classmethod
  def from_config(cls, config) -> "ScoreSettings":
    return cls(**rules.section(config, "evaluate", cls))

  @property
  def min_images(self) -> int:
    """Fewest images a set may have: precision and recall need more than k neighbours."""
    return self.neighbours + 1

  def check_count(self, num: int, what: str) -> None:
    if num < self.min_images:
      raise ValueError(
        f"{what} holds {num} images; expected at least {self.min_images} (precision and recall "
        f"take each image's {self.neighbours} nearest neighbours in its own set)"
      )


_RULES = {
  "reference": rules.TEXT,
  "reference_split": rules.SPLIT,
  "reference_num_images": rules.POSITIVE_INT,
  "data_dir": rules.TEXT,
  "image_size": rules.POSITIVE_INT,
  "inception": rules.TEXT,
  "preprocess": rules.one_of(*inception.PREPROCESS),
  "resize_to": (
    "an integer >= 75 (Inception-v3's smallest input; 299 is the published one)",
    lambda v: rules.is_int(v) and v >= 75,
  ),
  "batch_size": rules.POSITIVE_INT,
  "fid_method": rules.one_of(*metrics.FID_METHODS),
  "neighbours": rules.POSITIVE_INT,
  "is_split_size": rules.POSITIVE_INT,
  "distance_block": rules.POSITIVE_INT,
}


@dataclasses.dataclass
class Reference:
  """What the reference gives: images to compute features from, and/or statistics read from a
  file."""

  name: str
  images: Any = None  # NpzImages or DatasetImages.
  stats: dict | None = None  # mu, sigma and (if the file has them) mu_s, sigma_s.
  pool3: np.ndarray | None = None  # Features for precision and recall (a statistics file of ours).
  from_dataset: bool = False


def _check_recipe(z, members, path, e) -> None:
  """Statistics files of ours record how they were made; refuse one made with other
  preprocessing."""
  for key, want in (("preprocess", str(e.preprocess)), ("resize_to", int(e.resize_to))):
    if key in members:
      got = type(want)(z[key])
      if got != want:
        raise ValueError(
          f"evaluate.reference={str(path)!r} was computed with {key}={got!r}; expected "
          f"evaluate.{key}={want!r} (statistics of other inputs are not comparable)"
        )


def open_reference(e) -> Reference:
  field = "evaluate.reference"
  if not e.reference:
    raise ValueError(
      f"{field} is empty; expected an ADM reference npz, a statistics npz written by "
      "--mode=evaluate, or a data set ('digits', a TFDS name or directory, an image folder)"
    )
  path = epath.Path(e.reference)
  if path.is_file() or e.reference.endswith(".npz"):
    if not path.exists():
      raise ValueError(
        f"{field}={e.reference!r} does not exist; expected an npz file or a data set"
      )
    members = image_sets.npz_members(path, field)
    has_stats = "mu" in members and "sigma" in members
    if "arr_0" not in members and not has_stats:
      raise ValueError(
        f"{field}={e.reference!r} holds neither arr_0 images nor mu/sigma statistics (its "
        f"arrays: {sorted(members)}); expected an ADM reference batch or a statistics file"
      )
    ref = Reference(e.reference)
    if "arr_0" in members:
      ref.images = image_sets.open_npz_images(path, field)
    if has_stats:
      with path.open("rb") as f, np.load(f) as z:
        _check_recipe(z, members, path, e)
        ref.stats = {k: np.asarray(z[k], np.float64) for k in STATS_KEYS if k in members}
        if ref.images is None and "pool3" in members:
          ref.pool3 = np.asarray(z["pool3"], np.float32)
    return ref
  from npp_jax.data import images

  source = images.open_images(e.reference, e.reference_split, e.data_dir, field)
  n = min(int(e.reference_num_images), source.num_examples)
  return Reference(
    e.reference, images=image_sets.DatasetImages(source, n, int(e.image_size)), from_dataset=True
  )


def write_stats(path: epath.Path, pool3, spatial, e) -> dict:
  mu, sigma = metrics.statistics(pool3)
  mu_s, sigma_s = metrics.statistics(spatial)
  stats = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
  if jax.process_index() == 0:
    extra = {
      "pool3": pool3,
      "preprocess": np.array(e.preprocess),
      "resize_to": np.array(int(e.resize_to)),
    }
    files.atomic_write(str(path), lambda f: np.savez(f, **stats, **extra))
  return stats


def reference_statistics(ref: Reference, params, mesh, e, work: epath.Path) -> tuple[dict, Any]:
  """(mu, sigma, mu_s, sigma_s of the reference, its pool3 features or None): the file's statistics,
  else those of its images' features (cached under WORKDIR/evaluate/reference-*; a data set's also
  written to WORKDIR/reference_stats.npz, a reference for later runs)."""
  ref_stats, ref_pool3 = ref.stats or {}, ref.pool3
  if ref.images is not None:
    ref_pool3, ref_spatial = features.compute_features(
      ref.images,
      params,
      mesh,
      e,
      work / "evaluate" / "reference",
      dict(
        features.common_settings(e, params),
        source=ref.name,
        num=ref.images.num,
        split=str(e.reference_split),
        image_size=int(e.image_size),
      ),
      "reference",
    )
    if ref.from_dataset:
      ref_stats = write_stats(work / "reference_stats.npz", ref_pool3, ref_spatial, e)
    elif "mu" not in ref_stats:
      ref_stats = dict(
        zip(STATS_KEYS, (*metrics.statistics(ref_pool3), *metrics.statistics(ref_spatial)))
      )
  return ref_stats, ref_pool3


def scores(e, params, pool3, spatial, ref_stats: dict, ref_pool3) -> dict:
  """fid, sfid, inception_score, precision, recall of sample features against the reference's."""
  mu, sigma = metrics.statistics(pool3)
  mu_s, sigma_s = metrics.statistics(spatial)
  return score_stats(
    e,
    params,
    pool3,
    {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s},
    ref_stats,
    ref_pool3,
  )


def score_stats(e, params, pool3, sample_stats, ref_stats, ref_pool3) -> dict:
  def frechet(suffix):
    if f"mu{suffix}" not in ref_stats:
      logging.warning(
        "The reference has no mu%s/sigma%s: its %s is not computed.",
        suffix,
        suffix,
        "sFID" if suffix else "FID",
      )
      return None
    if ref_stats[f"mu{suffix}"].shape != sample_stats[f"mu{suffix}"].shape:
      raise ValueError(
        f"evaluate.reference={e.reference!r} has mu{suffix} of shape "
        f"{ref_stats[f'mu{suffix}'].shape}, the samples {sample_stats[f'mu{suffix}'].shape}; "
        "expected statistics of the same features (evaluate.resize_to)"
      )
    return metrics.frechet_distance(
      sample_stats[f"mu{suffix}"],
      sample_stats[f"sigma{suffix}"],
      ref_stats[f"mu{suffix}"],
      ref_stats[f"sigma{suffix}"],
      method=e.fid_method,
    )

  probs = metrics.inception_probs(pool3, np.asarray(params["fc"]["kernel"]))
  out = {
    "fid": frechet(""),
    "sfid": frechet("_s"),
    "inception_score": metrics.inception_score(probs, int(e.is_split_size)),
  }
  if ref_pool3 is None:
    logging.warning("The reference holds no pool3 features or images: no precision and recall.")
    out["precision"] = out["recall"] = None
  else:
    out["precision"], out["recall"] = metrics.precision_recall(
      ref_pool3, pool3, k=int(e.neighbours), block=int(e.distance_block)
    )
  return out


# --------------------------------------------------------------------------------------------------
# A whole scoring run.


@dataclasses.dataclass
class Inputs:
  """What scoring reads besides the images, loaded and checked (`load_inputs`) before any write."""

  reference: Reference
  params: dict  # The Inception's.
  converted: bool  # The weights came from pytorch-fid's .pth file: saved as WORKDIR/inception.


def load_inputs(settings: ScoreSettings) -> Inputs:
  """The reference opened (and counted) and the Inception weights loaded: one-line ValueErrors."""
  ref = open_reference(settings)
  if ref.images is not None:
    settings.check_count(ref.images.num, f"evaluate.reference={settings.reference!r}")
  params, converted = features.load_inception(settings.inception)
  return Inputs(ref, params, converted)


def evaluate(images, inputs: Inputs, settings: ScoreSettings, mesh, workdir, step: int = 0) -> dict:
  """Scores an image set (fid.images) against the reference: features over all devices (cached per
  batch under WORKDIR/evaluate/, so a killed run resumes), WORKDIR/sample_stats.npz, the reference's
  statistics, then WORKDIR/metrics.json and eval/ scalars at `step`; returns the metrics.json
  dict."""
  work = epath.Path(workdir)
  if jax.process_index() == 0:
    work.mkdir(parents=True, exist_ok=True)
    _keep_converted(inputs, settings, work)
  params = inputs.params
  pool3, spatial = features.compute_features(
    images,
    params,
    mesh,
    settings,
    work / "evaluate" / "samples",
    dict(features.common_settings(settings, params), source=str(images.path), num=images.num),
    "samples",
  )
  sample_stats = write_stats(work / "sample_stats.npz", pool3, spatial, settings)
  ref_stats, ref_pool3 = reference_statistics(inputs.reference, params, mesh, settings, work)
  result = score_stats(settings, params, pool3, sample_stats, ref_stats, ref_pool3)
  result.update(
    num_samples=images.num,
    num_reference=None if inputs.reference.images is None else inputs.reference.images.num,
    samples=str(images.path),
    reference=str(settings.reference),
    preprocess=str(settings.preprocess),
    resize_to=int(settings.resize_to),
    fid_method=str(settings.fid_method),
  )
  if jax.process_index() == 0:
    files.write_json(str(work / "metrics.json"), result)
  _log(result, str(workdir), step)
  return result


def _keep_converted(inputs: Inputs, settings: ScoreSettings, work: epath.Path) -> None:
  # One process only: orbax's save is collective across processes, and the conversion is a
  # convenience.
  if inputs.converted and jax.process_count() == 1 and not (work / "inception").exists():
    from npp_jax import checkpoints

    checkpoints.save_params(work / "inception", inputs.params)
    logging.info(
      "Converted %s into %s: pass that directory as evaluate.inception next time.",
      settings.inception,
      work / "inception",
    )


def _log(result: dict, workdir: str, step: int) -> None:
  writer = summaries.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  writer.write_scalars(int(step), {f"eval/{k}": result[k] for k in NAMES if result[k] is not None})
  writer.flush()
  writer.close()
  logging.info("Metrics: %s", json.dumps({k: result[k] for k in NAMES + ("num_samples",)}))
