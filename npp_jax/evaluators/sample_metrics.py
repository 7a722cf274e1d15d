"""FID, sFID, IS, precision and recall of fresh samples during training (evaluate.every_steps > 0).

As big_vision's evaluators: every evaluate.every_steps steps (and at the last step) the trainer
samples evaluate.num_samples images from the parameters it holds (the EMA with sample.use_ema), with
config.sample's settings on the run's mesh, and logs eval/fid, eval/sfid, eval/inception_score,
eval/precision, eval/recall beside eval/relative_cost (quality against training cost). The seed is
sample.seed at every evaluation, so successive numbers differ by the model only, and sample i is the
one `--mode=sample` draws (npp_jax.sample_set): the same settings and checkpoint give the same
images and the same FID.

Images and features stay in memory: nothing per evaluation is written but the scalars. `check` reads
every field and names every file before the trainer compiles anything; `create` loads the Inception
weights, the reference's statistics (a data set's cached in WORKDIR/evaluate/reference-* as
--mode=evaluate does) and the VQ, still before the first compile.
"""

import dataclasses
import time
from typing import Any

from absl import logging
from etils import epath
import jax
import numpy as np

from npp_jax import checkpoints
from npp_jax import preflight
from npp_jax import rules
from npp_jax import sample_set
from npp_jax import sampling
from npp_jax import sharding
from npp_jax.fid import features
from npp_jax.fid import scores
from npp_jax.models import gpt
from npp_jax.models import vq

SECTIONS = ("evaluate", "sample", "vq")


@dataclasses.dataclass(frozen=True)
class SampleMetricsSettings:
  every_steps: int  # > 0 (0 turns the evaluator off: check_settings returns None).
  num_samples: int  # Samples per evaluation.
  score: scores.ScoreSettings
  samples: sample_set.SampleSetSettings

  def __post_init__(self):
    rules.check("evaluate.every_steps", self.every_steps, rules.POSITIVE_INT)
    if not rules.is_int(self.num_samples) or self.num_samples < self.score.min_images:
      raise ValueError(
        f"evaluate.num_samples={self.num_samples!r} with evaluate.every_steps={self.every_steps}; "
        f"expected at least {self.score.min_images} samples per evaluation (precision and recall "
        f"use k = {self.score.neighbours} neighbours)"
      )

  @classmethod
  def from_config(cls, config) -> "SampleMetricsSettings":
    return cls(
      rules.get(config, "evaluate.every_steps"),
      rules.get(config, "evaluate.num_samples"),
      scores.ScoreSettings.from_config(config),
      sample_set.SampleSetSettings.from_config(config),
    )


_EVERY = ("an integer >= 0 (0: no sample metrics)", rules.COUNT[1])


def check_settings(config, model: gpt.GPTConfig, ema_decay: float, topology):
  """None when evaluate.every_steps is 0; else the settings, every rule and cross-section rule
  checked (one-line ValueErrors). ema_decay: optim.ema_decay, which sample.use_ema needs above 0."""
  every = rules.expect(config, "evaluate.every_steps", _EVERY)
  if every == 0:
    return None
  if model.condition == "text":
    # The evaluator draws class-conditional samples; a text model needs sampling from captions.
    raise ValueError(
      f"evaluate.every_steps={every} with model.condition='text'; expected 0 (sample metrics "
      "during training are for class models)"
    )
  s = SampleMetricsSettings.from_config(config)
  s.samples.check_model(model)
  s.samples.check_devices(topology.num_devices)
  sharding.check_batch(
    s.score.batch_size,
    sharding.MeshSettings.from_config(config),
    "evaluate.batch_size",
    num_devices=topology.num_devices,
    process_count=topology.process_count,
  )
  if s.samples.use_ema and not ema_decay > 0:
    raise ValueError(
      "sample.use_ema=True with evaluate.every_steps set, but optim.ema_decay=0 keeps no EMA; "
      "expected optim.ema_decay > 0 or sample.use_ema=False"
    )
  if not s.samples.vq_checkpoint:
    raise ValueError(
      "evaluate.every_steps is set but sample.vq_checkpoint is empty; expected "
      f"{preflight.VQ_WANTED} to decode the samples into images"
    )
  preflight.check_vq_fits(vq.VQConfig.from_config(rules.get(config, "vq")), model)
  if not s.score.reference:
    raise ValueError(
      "evaluate.every_steps is set but evaluate.reference is empty; expected an ADM "
      "reference npz, a statistics npz of --mode=evaluate, or a data set"
    )
  return s


def check(config, model: gpt.GPTConfig, ema_decay: float, topology):
  """check_settings, then the files it names (their kinds; their contents are read by `create`)."""
  s = check_settings(config, model, ema_decay, topology)
  if s is None:
    return None
  preflight.expect_weights(
    "sample.vq_checkpoint", s.samples.vq_checkpoint, preflight.VQ_KINDS, preflight.VQ_WANTED
  )
  inception = s.score.inception
  if not inception or not epath.Path(inception).exists():
    raise ValueError(
      f"evaluate.inception={inception!r} "
      + ("is empty" if not inception else "does not exist")
      + " while evaluate.every_steps is set; expected pytorch-fid's "
      "pt_inception-2015-12-05-6726825d.pth or the params directory --mode=evaluate made"
    )
  return s


@dataclasses.dataclass
class SampleMetrics:
  """The loaded inputs of the periodic evaluation; an evaluator of npp_jax.evaluators."""

  settings: SampleMetricsSettings
  total_steps: int  # The last step is always evaluated.
  model: gpt.GPTConfig  # As the sampler runs it: unscanned, in the compute dtype.
  vq_cfg: vq.VQConfig
  mesh: jax.sharding.Mesh
  sampler: sampling.Sampler  # On `mesh`, weights placed by config.mesh's rules.
  inception: Any  # Replicated on the mesh.
  vq_params: Any  # Replicated on the mesh.
  ref_stats: dict
  ref_pool3: np.ndarray | None
  seconds: float = 0.0  # Time spent here: the trainer leaves it out of its step time.

  def due(self, step: int) -> bool:
    return step % self.settings.every_steps == 0 or step == self.total_steps

  def __call__(self, state, step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    params = state.ema if self.settings.samples.use_ema else state.params
    params = self.sampler.place_params(params)  # Any training layout -> the sampler's.
    pool3, spatial = _features(self, _images(self, params))
    score = self.settings.score
    out = scores.scores(score, self.inception, pool3, spatial, self.ref_stats, self.ref_pool3)
    self.seconds += time.perf_counter() - t0
    logging.info(
      "Step %d: sample metrics of %d samples in %.1f s.",
      step,
      self.settings.num_samples,
      time.perf_counter() - t0,
    )
    return {f"eval/{k}": float(out[k]) for k in scores.NAMES if out[k] is not None}


def _images(m: SampleMetrics, params):
  """Yields the uint8 images of samples 0 .. num_samples - 1 a sampling batch at a time (every
  process gets all of them), drawn as --mode=sample draws them."""
  s, n = m.settings.samples, m.settings.num_samples
  for a in range(0, n, s.batch_size):
    out = sample_set.draw(m.sampler, params, m.vq_params, a, min(n, a + s.batch_size), s, m.vq_cfg)
    yield out["arr_0"]


def _features(m: SampleMetrics, image_batches) -> tuple[np.ndarray, np.ndarray]:
  """(pool3, spatial) of every image, in global batches of evaluate.batch_size as
  --mode=evaluate."""
  score = m.settings.score
  ebs = score.batch_size
  fn = features.feature_fn(m.mesh, score.preprocess, score.resize_to)
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


def create(
  s: SampleMetricsSettings, config, model: gpt.GPTConfig, workdir, mesh, total_steps: int
) -> SampleMetrics:
  """The evaluator with its inputs loaded and checked (one-line ValueErrors) and the reference's
  statistics computed, before the trainer compiles anything."""
  inputs = scores.load_inputs(s.score)
  vq_cfg = vq.VQConfig.from_config(config.vq)
  vq_params = checkpoints.load_vq_params(s.samples.vq_checkpoint, config.vq)
  sampler = sampling.Sampler(
    s.samples.sampler_model(model), s.samples.sampling, mesh, sharding.axis_rules(config.mesh)
  )
  ref_stats, ref_pool3 = scores.reference_statistics(
    inputs.reference, inputs.params, mesh, s.score, epath.Path(workdir)
  )
  if "mu" not in ref_stats:
    raise ValueError(
      f"evaluate.reference={s.score.reference!r} gives no mu/sigma statistics; expected a "
      "reference FID can be computed against"
    )
  rep = sharding.replicated(mesh)
  logging.info(
    "Sample metrics every %d steps: %d samples against %s.",
    s.every_steps,
    s.num_samples,
    s.score.reference,
  )
  return SampleMetrics(
    s,
    total_steps,
    s.samples.sampler_model(model),
    vq_cfg,
    mesh,
    sampler,
    sharding.put(inputs.params, rep),
    sharding.put(vq_params, rep),
    ref_stats,
    ref_pool3,
  )
