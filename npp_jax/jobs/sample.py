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
from npp_jax import sampling
from npp_jax import sharding
from npp_jax import validate
from npp_jax.models import gpt

# ---------------------------------------------------------------------------------------------------------
# The sampling job: python -m npp_jax.main --mode=sample --config=... --workdir=DIR


def check_params(params, model_config, what: str) -> None:
  """One-line error when a parameter tree does not have the shapes of config.model (naming the release
  size it looks like, if any)."""
  got = checkpoints.param_shapes_of(gpt.unstack_layers(params))
  n_layer = sum(1 for k in got if k.startswith("layers_") and k.endswith("attention/wo/kernel"))
  dim = got.get("tok_embeddings/embedding", (0, 0))[-1]
  names = [name for name, (l, _, d) in gpt.MODEL_SIZES.items() if (l, d) == (n_layer, dim)]
  size = f" (it looks like {names[0]})" if names else ""
  try:
    checkpoints.check_param_shapes(
      gpt.unstack_layers(params),
      gpt.param_shapes(model_config),
      f"{what} does not fit model.name={model_config.name!r}{size}",
    )
  except ValueError as e:
    raise ValueError(
      f"{e}; expected a checkpoint of the configured model (set --config.model.name)"
    ) from None


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


def _write_grid(
  path: epath.Path, images_of, labels: np.ndarray, sample_config, num_classes: int
) -> None:
  """PNG, one class per row: row r shows the first images of the r-th class sampled (sample.classes, or
  all classes in order), at most grid_rows rows of grid_cols images."""
  from PIL import Image

  rows, cols = sample_config.grid_rows, sample_config.grid_cols
  classes = list(sample_config.classes) or list(range(num_classes))
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


@dataclasses.dataclass(frozen=True)
class _Job:
  """A sampling job checked against its config, before anything is loaded, compiled or written."""

  cfg: gpt.GPTConfig  # Unscanned, in the sampling compute dtype.
  vq_cfg: Any  # vq.VQConfig, or None: codes only.
  mesh: jax.sharding.Mesh
  sampler: sampling.Sampler  # On `mesh`, weights placed by config.mesh's rules.
  out_dir: epath.Path
  settings: dict
  num_images: int
  batch_size: int

  @property
  def spans(self) -> list[tuple[int, int]]:
    """[start, end) of the samples in each shard: one shard per global batch."""
    n, bs = self.num_images, self.batch_size
    return [(a, min(a + bs, n)) for a in range(0, n, bs)]

  def shard_path(self, span) -> epath.Path:
    width = len(str(self.num_images))
    return self.out_dir / f"shard_{span[0]:0{width}d}-{span[1]:0{width}d}.npz"


def sample_and_save(config: ml_collections.ConfigDict, workdir: str, *, params=None) -> str:
  """Samples config.sample.num_images images (or codes) into WORKDIR/samples; returns the merged file.

  One shard file per global batch, written atomically, so a killed run resumes where it stopped. Every
  setting is checked before anything compiles or is written. `params` (GPT parameters) replaces loading
  sample.checkpoint (tests, notebooks).
  """
  job = _check_job(config, workdir, params is not None)
  files.check_same_settings(
    str(job.out_dir / "meta.json"),
    job.settings,
    str(job.out_dir),
    "samples",
    "expected the same settings or another --workdir",
  )
  s = config.sample
  if params is None:
    params = checkpoints.load_params(s.checkpoint, ema=s.use_ema)
  check_params(params, config.model, f"checkpoint {s.checkpoint or '(given params)'}")
  vq_params = None
  if job.vq_cfg is not None:
    vq_params = checkpoints.load_vq_params(s.vq_checkpoint, config.vq)
  else:
    logging.info("No sample.vq_checkpoint: writing codes and labels only, no images.")
  return str(_run_job(job, s, params, vq_params))


def _check_job(config, workdir, have_params: bool) -> _Job:
  """The whole job's settings, checked; one-line ValueErrors, nothing loaded or written."""
  s = config.sample
  cfg = dataclasses.replace(
    gpt.GPTConfig.from_config(config.model),
    scan_layers=False,
    dtype=sampling.compute_dtype(s, config.model),
  )
  settings = sampling.SamplingSettings.from_config(config).check_vocab(cfg.vocab_size)
  n, bs = (
    validate.positive_int(s.num_images, "sample.num_images"),
    validate.positive_int(s.batch_size, "sample.batch_size"),
  )
  if s.grid_rows < 1 or s.grid_cols < 1:
    raise ValueError(
      f"sample.grid_rows={s.grid_rows}, sample.grid_cols={s.grid_cols}; expected >= 1"
    )
  bad = [c for c in s.classes if int(c) != c or not 0 <= c < cfg.num_classes]
  if bad:
    raise ValueError(
      f"sample.classes holds class id {bad[0]} out of range; expected ids in [0, {cfg.num_classes})"
    )
  mesh = sharding.make_mesh(config.mesh)
  if bs % mesh.size:
    raise ValueError(
      f"sample.batch_size={bs} over {mesh.size} devices; expected a multiple of "
      f"{mesh.size} (every device decodes the same number of samples)"
    )
  if not have_params and not s.checkpoint:
    raise ValueError(
      "sample.checkpoint is empty; expected a training workdir or a converted checkpoint"
    )
  if not have_params and not epath.Path(s.checkpoint).exists():
    raise ValueError(
      f"sample.checkpoint={s.checkpoint!r} does not exist; expected a training workdir, its "
      "checkpoints/ folder, or a converted checkpoint"
    )
  vq_cfg = _check_vq(config, cfg) if s.vq_checkpoint else None
  sampler = sampling.Sampler(cfg, settings, mesh, sharding.rules(config.mesh))
  return _Job(cfg, vq_cfg, mesh, sampler, epath.Path(workdir) / "samples", _settings(config), n, bs)


def _check_vq(config, cfg: gpt.GPTConfig):
  """The VQ that turns codes into images must fit the GPT's codebook and grid."""
  from npp_jax.models import vq

  s = config.sample
  if "vq" not in config:
    raise ValueError(
      "sample.vq_checkpoint is set but the config has no vq section; expected config.vq "
      "(config_lib.vq_config()) describing the tokenizer"
    )
  if not epath.Path(s.vq_checkpoint).is_dir():
    raise ValueError(
      f"sample.vq_checkpoint={s.vq_checkpoint!r} is not a directory; expected a VQ "
      "checkpoint converted with npp_jax.convert --kind=vq, or '' for codes only"
    )
  vq_cfg = vq.VQConfig.from_config(config.vq)
  if vq_cfg.codebook_size != cfg.vocab_size:
    raise ValueError(
      f"vq.codebook_size={vq_cfg.codebook_size} but model.vocab_size={cfg.vocab_size}; "
      "expected the tokenizer the model was trained on"
    )
  if vq_cfg.grid != cfg.grid:
    raise ValueError(
      f"vq.image_size={vq_cfg.image_size} gives a {vq_cfg.grid} code grid but "
      f"model.grid={cfg.grid}; expected the same grid"
    )
  return vq_cfg


def _run_job(job: _Job, s, params, vq_params) -> epath.Path:
  """Samples the shards not on disk yet, then the merged .npz and the PNG grid (process 0 writes)."""
  is_main = jax.process_index() == 0
  n, bs, cfg = job.num_images, job.batch_size, job.cfg
  if is_main:
    job.out_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(str(job.out_dir / "meta.json"), job.settings)
  # Placed once for the whole job, split as config.mesh splits training's weights: every batch
  # reuses the same device copies. On several processes each fills its own devices' shards; each
  # process samples its devices' share of every batch.
  rep = sharding.replicated(job.mesh)
  params = job.sampler.place_params(params)
  if vq_params is not None:
    vq_params = sharding.put(vq_params, rep)
  rng = sharding.put(jax.random.key(int(s.seed)), rep)
  spans = job.spans
  todo = _shards_to_do(job)
  done = n - sum(spans[i][1] - spans[i][0] for i in todo)
  if done:
    logging.info("Resuming: %d of %d samples already in %s.", done, n, job.out_dir)
  from tqdm import tqdm

  bar = tqdm(total=n, initial=done, unit="img", desc="sampling", disable=not is_main, smoothing=0.3)
  for i in todo:
    a, b = spans[i]
    labels = sampling.sample_labels(
      s, cfg.num_classes, np.arange(a, a + bs)
    )  # Padded to bs past the end.
    codes = job.sampler.sample(params, labels, rng, first_index=a)
    out = {"codes": sharding.gather(codes)[: b - a], "labels": labels[: b - a]}
    if vq_params is not None:
      out["arr_0"] = sampling.decode_images(vq_params, out["codes"], job.vq_cfg, job.mesh)
    if is_main:
      files.atomic_write(str(job.shard_path(spans[i])), lambda f: np.savez(f, **out))
    bar.update(b - a)
  bar.close()
  merged = job.out_dir / f"samples_{n}.npz"
  if is_main and (todo or not merged.exists()):
    _write_outputs(job, s, merged, vq_params is not None)
  if jax.process_count() > 1:  # Nobody returns a path before process 0 has written it.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("npp_jax.jobs.sample.sample_and_save")
  return merged


def _shards_to_do(job: _Job) -> list[int]:
  """Shards not on disk yet, as process 0 sees them: every process must run the same batches (each one
  is a collective), even where a process sees another filesystem."""
  missing = np.array([not job.shard_path(span).exists() for span in job.spans])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
  return [int(i) for i in np.flatnonzero(missing)]


def _write_outputs(job: _Job, s, merged: epath.Path, images: bool) -> None:
  """The merged .npz of every shard and, with images, the PNG grid of the first samples per class."""
  paths = [job.shard_path(span) for span in job.spans]
  _merge(merged, paths, job.num_images)
  if images:
    bs = job.batch_size

    def images_of(indices):
      shards = {}
      for j in sorted(set(int(i) // bs for i in indices)):  # Each shard read once.
        with paths[j].open("rb") as f, np.load(f) as z:
          shards[j] = z["arr_0"]
      return np.stack([shards[i // bs][i % bs] for i in indices])

    all_labels = sampling.sample_labels(s, job.cfg.num_classes, np.arange(job.num_images))
    _write_grid(
      job.out_dir / f"samples_{job.num_images}.png", images_of, all_labels, s, job.cfg.num_classes
    )
  logging.info("Wrote %d %s to %s.", job.num_images, "images" if images else "code grids", merged)
