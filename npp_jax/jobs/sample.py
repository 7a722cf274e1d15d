"""The sampling job: python -m npp_jax.main --mode=sample --config=... --workdir=DIR

Class-conditional samples (codes, and images with a VQ) of a checkpoint into WORKDIR/samples, one shard file
per global batch so that a killed run resumes; the sampler itself is `npp_jax.sampling`.
"""

import dataclasses
from typing import Any
import zipfile

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np

from npp_jax import checkpoints
from npp_jax import files
from npp_jax import jobs
from npp_jax import preflight
from npp_jax import rules
from npp_jax import sample_set
from npp_jax import sharding
from npp_jax.fid import images as image_sets
from npp_jax.fid import scores
from npp_jax.models import gpt
from npp_jax.models import vq

SECTIONS = ("model", "sample", "mesh", "vq", "evaluate")


@dataclasses.dataclass(frozen=True)
class SampleJobSettings:
  """The sampling job's `sample` fields beside the ones every sample set has (sample_set)."""

  checkpoint: str  # A training workdir, its checkpoints/ folder, or a GPT params directory.
  num_images: int
  grid_rows: int  # PNG: one row per class, at most this many rows of grid_cols images.
  grid_cols: int
  samples: sample_set.SampleSetSettings

  def __post_init__(self):
    rules.check_fields(self, "sample", _RULES)

  @classmethod
  def from_config(cls, config) -> "SampleJobSettings":
    samples = sample_set.SampleSetSettings.from_config(config)
    return cls(**rules.section(config, "sample", cls, samples=samples))


_RULES = {
  "checkpoint": rules.TEXT,
  "num_images": rules.POSITIVE_INT,
  "grid_rows": rules.POSITIVE_INT,
  "grid_cols": rules.POSITIVE_INT,
}


@dataclasses.dataclass(frozen=True)
class Plan:
  """A sampling job checked against its config, before anything is loaded, compiled or written."""

  settings: SampleJobSettings
  model: gpt.GPTConfig  # As the sampler runs it: unscanned, in the compute dtype.
  vq_cfg: Any  # vq.VQConfig, or None: codes only.
  score: scores.ScoreSettings | None  # evaluate.reference set: the samples are scored.
  out_dir: epath.Path
  meta: dict  # What fixes the content of sample i (WORKDIR/samples/meta.json).

  @property
  def spans(self) -> list[tuple[int, int]]:
    """[start, end) of the samples in each shard: one shard per global batch."""
    n, bs = self.settings.num_images, self.settings.samples.batch_size
    return [(a, min(a + bs, n)) for a in range(0, n, bs)]

  def shard_path(self, span) -> epath.Path:
    width = len(str(self.settings.num_images))
    return self.out_dir / f"shard_{span[0]:0{width}d}-{span[1]:0{width}d}.npz"


def check_settings(config, topology: jobs.Topology):
  """(job settings, sampler's model, VQ config or None, score settings or None), every rule checked."""
  model = gpt.GPTConfig.from_config(rules.get(config, "model"))
  s = SampleJobSettings.from_config(config)
  sharding.MeshSettings.from_config(config).resolve(topology.num_devices)
  s.samples.check_model(model)
  s.samples.check_devices(topology.num_devices)
  vq_cfg = None
  if s.samples.vq_checkpoint:
    vq_cfg = vq.VQConfig.from_config(rules.get(config, "vq"))
  score = None
  if rules.get(config, "evaluate.reference"):  # Score what is sampled.
    score = scores.ScoreSettings.from_config(config)
    if not s.samples.vq_checkpoint:
      raise ValueError(
        "evaluate.reference is set but sample.vq_checkpoint is empty: codes only, no images "
        "to score; expected a VQ checkpoint, or evaluate.reference='' to sample only"
      )
    score.check_count(s.num_images, "sample.num_images with evaluate.reference set")
  return s, s.samples.sampler_model(model), vq_cfg, score


def check(config, workdir, topology: jobs.Topology, *, params_given: bool = False) -> Plan:
  """Every field, the workdir, the weights' kinds and the samples already in WORKDIR/samples; one-line
  ValueErrors, nothing loaded or written. params_given: run() was handed the GPT's parameters."""
  work = preflight.check_workdir(workdir)
  s, model, vq_cfg, score = check_settings(config, topology)
  if not params_given:
    preflight.expect_weights(
      "sample.checkpoint", s.checkpoint, preflight.GPT_KINDS, preflight.GPT_WANTED
    )
  if vq_cfg is not None:
    preflight.expect_weights(
      "sample.vq_checkpoint", s.samples.vq_checkpoint, preflight.VQ_KINDS, preflight.VQ_WANTED
    )
    preflight.check_vq_fits(vq_cfg, model)
  plan = Plan(s, model, vq_cfg, score, work / "samples", _settings(config))
  files.check_same_settings(
    str(plan.out_dir / "meta.json"),
    plan.meta,
    str(plan.out_dir),
    "samples",
    "expected the same settings or another --workdir",
  )
  return plan


def _absolute(path: str) -> str:
  # A path with a scheme (gs://) is absolute already and must stay as it is.
  return "" if not path else path if "://" in path else str(epath.Path(path).absolute())


def _settings(config) -> dict:
  """What fixes the content of sample i: a resumed run must agree on all of it."""
  s = config.sample
  return {
    "checkpoint": _absolute(s.checkpoint),
    "use_ema": bool(s.use_ema),
    "vq_checkpoint": _absolute(s.vq_checkpoint),
    "classes": [int(c) for c in s.classes],
    "cfg_scale": float(s.cfg_scale),
    "cfg_interval": int(s.cfg_interval),
    "temperature": float(s.temperature),
    "top_k": int(s.top_k),
    "top_p": float(s.top_p),
    "seed": int(s.seed),
    "dtype": str(s.dtype),
    "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.items()},
  }


def _merge(path: epath.Path, shard_paths: list[epath.Path], n: int) -> None:
  """One .npz of all shards, streamed: 50k images (10 GB) never sit in memory at once."""
  with shard_paths[0].open("rb") as f, np.load(f) as z:
    keys = {k: (z[k].shape[1:], z[k].dtype) for k in z.files}

  def write(f):
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for key, (shape, dtype) in keys.items():
        with zf.open(f"{key}.npy", "w", force_zip64=True) as out:
          header = {
            "descr": np.lib.format.dtype_to_descr(dtype),
            "fortran_order": False,
            "shape": (n, *shape),
          }
          np.lib.format.write_array_header_1_0(out, header)
          for shard in shard_paths:
            with shard.open("rb") as f_in, np.load(f_in) as z:
              out.write(np.ascontiguousarray(z[key], dtype=dtype).tobytes())

  files.atomic_write(str(path), write)


def _write_grid(path: epath.Path, images_of, labels: np.ndarray, plan: Plan) -> None:
  """PNG, one class per row: row r shows the first images of the r-th class sampled (sample.classes, or
  all classes in order), at most grid_rows rows of grid_cols images."""
  from PIL import Image

  rows, cols = plan.settings.grid_rows, plan.settings.grid_cols
  classes = list(plan.settings.samples.classes) or list(range(plan.model.num_classes))
  picks = [np.flatnonzero(labels == c)[:cols] for c in classes[:rows]]
  picks = [p for p in picks if len(p)]
  cells = images_of(np.concatenate(picks))
  h, w = cells.shape[1:3]
  grid = np.zeros((len(picks) * h, cols * w, 3), np.uint8)
  i = 0
  for r, row in enumerate(picks):
    for c in range(len(row)):
      grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = cells[i]
      i += 1
  files.atomic_write(str(path), lambda f: Image.fromarray(grid).save(f, format="PNG"))


def run(config: ml_collections.ConfigDict, workdir: str, *, params=None) -> jobs.Result:
  """Samples config.sample.num_images images (or codes) into WORKDIR/samples, and scores them when
  evaluate.reference is set; outputs: "samples" (the merged .npz) and, scored, "metrics".

  One shard file per global batch, written atomically, so a killed run resumes where it stopped. Every
  setting is checked, and the scoring inputs loaded, before anything compiles or is written. `params`
  (GPT parameters) replaces loading sample.checkpoint (tests, notebooks).
  """
  plan = check(config, workdir, jobs.Topology.current(), params_given=params is not None)
  s = plan.settings
  inputs = None if plan.score is None else scores.load_inputs(plan.score)
  if params is None:
    params = checkpoints.load_params(s.checkpoint, ema=s.samples.use_ema)
  checkpoints.check_gpt_params(
    params, config.model, f"checkpoint {s.checkpoint or '(given params)'}"
  )
  vq_params = None
  if plan.vq_cfg is not None:
    vq_params = checkpoints.load_vq_params(s.samples.vq_checkpoint, config.vq)
  else:
    logging.info("No sample.vq_checkpoint: writing codes and labels only, no images.")
  mesh = sharding.make_mesh(config.mesh)
  merged = _run_job(plan, mesh, params, vq_params)
  outputs = {"samples": str(merged)}
  if inputs is not None:
    images = image_sets.open_npz_images(merged, "the samples")
    outputs["metrics"] = scores.evaluate(images, inputs, plan.score, mesh, workdir)
  return jobs.Result(outputs=outputs)


def _run_job(plan: Plan, mesh, params, vq_params) -> epath.Path:
  """Samples the shards not on disk yet, then the merged .npz and the PNG grid (process 0 writes)."""
  is_main = jax.process_index() == 0
  n, s = plan.settings.num_images, plan.settings.samples
  if is_main:
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(str(plan.out_dir / "meta.json"), plan.meta)
  # Placed once for the whole job: every batch reuses the same device copies. On several processes each
  # fills its own devices' shards; each process samples its devices' share of every batch.
  rep = sharding.replicated(mesh)
  params = sharding.put(gpt.unstack_layers(params), rep)
  if vq_params is not None:
    vq_params = sharding.put(vq_params, rep)
  spans = plan.spans
  todo = _shards_to_do(plan)
  done = n - sum(spans[i][1] - spans[i][0] for i in todo)
  if done:
    logging.info("Resuming: %d of %d samples already in %s.", done, n, plan.out_dir)
  from tqdm import tqdm

  bar = tqdm(total=n, initial=done, unit="img", desc="sampling", disable=not is_main, smoothing=0.3)
  for i in todo:
    a, b = spans[i]
    out = sample_set.draw(params, vq_params, a, b, s, plan.model, plan.vq_cfg, mesh)
    if is_main:
      files.atomic_write(str(plan.shard_path(spans[i])), lambda f: np.savez(f, **out))
    bar.update(b - a)
  bar.close()
  merged = plan.out_dir / f"samples_{n}.npz"
  if is_main and (todo or not merged.exists()):
    _write_outputs(plan, merged, vq_params is not None)
  if jax.process_count() > 1:  # Nobody returns a path before process 0 has written it.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("npp_jax.jobs.sample.run")
  return merged


def _shards_to_do(job: Plan) -> list[int]:
  """Shards not on disk yet, as process 0 sees them: every process must run the same batches (each one
  is a collective), even where a process sees another filesystem."""
  missing = np.array([not job.shard_path(span).exists() for span in job.spans])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
  return [int(i) for i in np.flatnonzero(missing)]


def _write_outputs(plan: Plan, merged: epath.Path, images: bool) -> None:
  """The merged .npz of every shard and, with images, the PNG grid of the first samples per class."""
  paths = [plan.shard_path(span) for span in plan.spans]
  n, s = plan.settings.num_images, plan.settings.samples
  _merge(merged, paths, n)
  if images:
    bs = s.batch_size

    def images_of(indices):
      shards = {}
      for j in sorted(set(int(i) // bs for i in indices)):  # Each shard read once.
        with paths[j].open("rb") as f, np.load(f) as z:
          shards[j] = z["arr_0"]
      return np.stack([shards[i // bs][i % bs] for i in indices])

    all_labels = s.labels(np.arange(n), plan.model.num_classes)
    _write_grid(plan.out_dir / f"samples_{n}.png", images_of, all_labels, plan)
  logging.info("Wrote %d %s to %s.", n, "images" if images else "code grids", merged)
