"""FID, sFID, IS, precision and recall of fresh samples during training (evaluate.every_steps > 0).

As big_vision's evaluators: every evaluate.every_steps steps (and at the last step) the trainer samples
evaluate.num_samples images from the parameters it holds (the EMA with sample.use_ema), with
config.sample's settings on the run's mesh, and logs eval/fid, eval/sfid, eval/inception_score,
eval/precision, eval/recall beside eval/relative_cost (quality against training cost). The seed is
sample.seed at every evaluation, so successive numbers differ by the model only, and sample i is the one
`--mode=sample` would draw: the same settings and checkpoint give the same images and the same FID.

Images and features stay in memory: nothing per evaluation is written but the scalars. Everything is
loaded and checked once, before the trainer compiles its first step (`prepare`): the Inception weights,
the reference's statistics (a data set's cached in WORKDIR/evaluate/reference-* as --mode=evaluate does),
and the VQ that turns codes into images.
"""

import dataclasses
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from npp_jax import checkpoints
from npp_jax import costs
from npp_jax import preflight
from npp_jax import sampling
from npp_jax import sharding
from npp_jax.fid import features
from npp_jax.fid import scores as fid_scores
from npp_jax.jobs import evaluate
from npp_jax.jobs import sample as sample_job
from npp_jax.models import gpt

NAMES = ("fid", "sfid", "inception_score", "precision", "recall")


@dataclasses.dataclass
class SampleMetrics:
  """The loaded inputs of the periodic evaluation; `scorer(state, step, writer)` runs one."""

  config: ml_collections.ConfigDict
  plan: Any  # train.Plan: the schedule whose cost each evaluation is logged against.
  cfg: gpt.GPTConfig  # Unscanned, in the sampling compute dtype.
  vq_cfg: Any
  mesh: jax.sharding.Mesh
  sampler: sampling.Sampler  # On `mesh`, weights placed by config.mesh's rules.
  inception: Any  # Replicated on the mesh.
  vq_params: Any  # Replicated on the mesh.
  ref_stats: dict
  ref_pool3: np.ndarray | None
  seconds: float = 0.0  # Time spent here: the trainer leaves it out of its step time.

  def due(self, step: int) -> bool:
    every = int(self.config.evaluate.every_steps)
    return step % every == 0 or step == self.plan.total_steps

  def __call__(self, state, step: int, writer) -> dict:
    t0 = time.perf_counter()
    s, e = self.config.sample, self.config.evaluate
    params = state.ema if s.use_ema else state.params
    params = self.sampler.place_params(params)  # Any training layout -> the sampler's.
    pool3, spatial = _features(self, _images(self, params))
    out = fid_scores.scores(e, self.inception, pool3, spatial, self.ref_stats, self.ref_pool3)
    scalars = {f"eval/{k}": float(out[k]) for k in NAMES if out[k] is not None}
    scalars["eval/relative_cost"] = costs.cumulative_relative_cost(
      self.plan.schedule, self.plan.cfg, step
    )
    writer.write_scalars(step, scalars)
    self.seconds += time.perf_counter() - t0
    logging.info(
      "Step %d: %s of %d samples (%.1f s).",
      step,
      ", ".join(f"{k} {v:.4g}" for k, v in scalars.items()),
      int(e.num_samples),
      time.perf_counter() - t0,
    )
    return {k: v for k, v in scalars.items() if k != "eval/relative_cost"}


def _images(m: SampleMetrics, params):
  """Yields the uint8 images of samples 0 .. num_samples - 1 a sampling batch at a time (every process
  gets all of them), drawn exactly as sample.sample_and_save draws them."""
  s, n = m.config.sample, int(m.config.evaluate.num_samples)
  bs = int(s.batch_size)
  rng = sharding.put(jax.random.key(int(s.seed)), sharding.replicated(m.mesh))
  for a in range(0, n, bs):
    labels = sampling.sample_labels(s, m.cfg.num_classes, np.arange(a, a + bs))
    codes = m.sampler.sample(params, labels, rng, first_index=a)
    codes = sharding.gather(codes)[: min(n, a + bs) - a]
    yield sampling.decode_images(m.vq_params, codes, m.vq_cfg, m.mesh)  # pylint: disable=protected-access


def _features(m: SampleMetrics, image_batches) -> tuple[np.ndarray, np.ndarray]:
  """(pool3, spatial) of every image, in global batches of evaluate.batch_size as --mode=evaluate."""
  e = m.config.evaluate
  ebs = int(e.batch_size)
  fn = features.feature_fn(m.mesh, e.preprocess, int(e.resize_to))  # pylint: disable=protected-access
  pool3, spatial, buffer = [], [], None

  def flush(rows):
    f = features.batch_features(
      fn, m.inception, m.mesh, lambda i, j: rows[i:j], 0, len(rows), ebs, rows.shape[1:]
    )
    pool3.append(f[0])
    spatial.append(f[1])

  for images in image_batches:
    buffer = images if buffer is None else np.concatenate([buffer, images])
    while len(buffer) >= ebs:
      flush(buffer[:ebs])
      buffer = buffer[ebs:]
  if buffer is not None and len(buffer):
    flush(buffer)
  return np.concatenate(pool3), np.concatenate(spatial)


def prepare(config: ml_collections.ConfigDict, workdir: str, plan) -> SampleMetrics | None:
  """None when evaluate.every_steps is 0; else every input checked and loaded (one-line ValueErrors),
  the reference's statistics computed, before the trainer compiles anything."""
  e, s = config.evaluate, config.sample
  every = e.every_steps
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise ValueError(
      f"evaluate.every_steps={every!r}; expected an integer >= 0 (0: no sample metrics)"
    )
  if every == 0:
    return None
  preflight.check_sample_metrics(config, jax.device_count(), jax.process_count())
  cfg = dataclasses.replace(
    plan.cfg, scan_layers=False, dtype=sampling.compute_dtype(s, config.model)
  )  # pylint: disable=protected-access
  settings = sampling.SamplingSettings.from_config(config).check_vocab(cfg.vocab_size)
  mesh = sharding.make_mesh(config.mesh)
  if s.batch_size % mesh.size:
    raise ValueError(
      f"sample.batch_size={s.batch_size} over {mesh.size} devices; expected a multiple of "
      f"{mesh.size} (every device decodes the same number of samples)"
    )
  sampler = sampling.Sampler(cfg, settings, mesh, sharding.rules(config.mesh))
  vq_cfg = sample_job._check_vq(config, cfg)  # pylint: disable=protected-access
  evaluate._check_config(config)  # pylint: disable=protected-access
  ref = fid_scores.open_reference(e)
  evaluate._check_count(ref.images, f"evaluate.reference={e.reference!r}", e)  # pylint: disable=protected-access
  inception, _ = features.load_inception(e.inception)
  vq_params = checkpoints.load_vq_params(s.vq_checkpoint, config.vq)
  ref_stats, ref_pool3 = fid_scores.reference_statistics(
    ref, inception, mesh, e, epath.Path(workdir)
  )
  if "mu" not in ref_stats:
    raise ValueError(
      f"evaluate.reference={e.reference!r} gives no mu/sigma statistics; expected a "
      "reference FID can be computed against"
    )
  rep = sharding.replicated(mesh)
  logging.info(
    "Sample metrics every %d steps: %d samples against %s.", every, e.num_samples, e.reference
  )
  return SampleMetrics(
    config,
    plan,
    cfg,
    vq_cfg,
    mesh,
    sampler,
    sharding.put(inception, rep),
    sharding.put(vq_params, rep),
    ref_stats,
    ref_pool3,
  )
