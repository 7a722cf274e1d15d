"""The reference (an ADM batch, a statistics file, or a data set) and the scores of sample features
against it: FID, sFID, Inception Score, precision and recall."""

import dataclasses
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np

from npp_jax import files
from npp_jax import validate
from npp_jax.fid import features
from npp_jax.fid import images as image_sets
from npp_jax.fid import metrics

STATS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


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
  n = min(
    validate.positive_int(e.reference_num_images, "evaluate.reference_num_images"),
    source.num_examples,
  )
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
  """(mu, sigma, mu_s, sigma_s of the reference, its pool3 features or None): the file's statistics, else
  those of its images' features (cached under WORKDIR/evaluate/reference-*; a data set's also written to
  WORKDIR/reference_stats.npz, a reference for later runs)."""
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
