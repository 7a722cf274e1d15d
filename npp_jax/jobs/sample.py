"""The sampling job: python -m npp_jax.main --mode=sample --config=... --workdir=DIR

Class-conditional samples (codes, and images with a VQ) of a checkpoint into WORKDIR/samples, one
shard file per global batch so that a killed run resumes; the sampler itself is `npp_jax.sampling`.
A text model samples each caption (sample.prompts through sample.text_encoder, or
sample.caption_features) sample.images_per_caption times, in caption order: the npz holds `codes`
and `caption_index`. With evaluate.reference set the samples are scored through the fid library.
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
from npp_jax import sampling
from npp_jax import sharding
from npp_jax import shards
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
  num_images: int  # sample.num_images; a text model: captions x sample.images_per_caption.
  captions: Any = None  # A text model's captions (_FeatureFolder or _Prompts); None: classes.

  @property
  def images_per_caption(self) -> int:
    return self.settings.samples.sampling.images_per_caption

  def caption_index(self, indices) -> np.ndarray:
    """Caption of each global sample index (past the end: the last caption, padding)."""
    return np.minimum(np.asarray(indices) // self.images_per_caption, len(self.captions) - 1)

  @property
  def shards(self) -> shards.Shards:
    """One shard per global batch, shard_<start>-<end>.npz, the settings in meta.json."""
    return shards.Shards(self.out_dir, self.num_images, self.settings.samples.batch_size)


def check_settings(config, topology: jobs.Topology):
  """(job settings, sampler's model, VQ config or None, score settings or None), every rule
  checked."""
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
  """Every field, the workdir, the weights' kinds and the samples already in WORKDIR/samples;
  one-line ValueErrors, nothing loaded or written. params_given: run() was handed the GPT's
  parameters."""
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
  captions, n = None, s.num_images
  if s.samples.sampling.text:
    captions = _check_captions(s.samples.sampling, model)
    n = len(captions) * s.samples.sampling.images_per_caption  # Each caption, that many times.
  meta = _settings(config, captions)
  plan = Plan(s, model, vq_cfg, score, work / "samples", meta, n, captions)
  plan.shards.check_settings(meta, "samples", "expected the same settings or another --workdir")
  return plan


def _absolute(path: str) -> str:
  # A path with a scheme (gs://) is absolute already and must stay as it is.
  return "" if not path else path if "://" in path else str(epath.Path(path).absolute())


def _settings(config, captions=None) -> dict:
  """What fixes the content of sample i: a resumed run must agree on all of it."""
  s = config.sample
  text = {}
  if captions is not None:
    text = {
      "captions": captions.what,
      "text_encoder": _absolute(s.text_encoder),
      "images_per_caption": int(s.images_per_caption),
    }
  return {
    **text,
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


# -------------------------------------------------------------------------------------------------
# Captions of a text model's run.


class _FeatureFolder:
  """sample.caption_features: LlamaGen's T5 features 0.npy .. N-1.npy, each float (1, L, dim)."""

  def __init__(self, path: str, cfg: gpt.GPTConfig):
    self.folder = epath.Path(path)
    field = f"sample.caption_features={path!r}"
    if not self.folder.is_dir():
      raise ValueError(f"{field} is not a directory; expected a folder of 0.npy .. N-1.npy")
    names = {p.name for p in self.folder.glob("*.npy")}
    n = len(names)
    missing = [i for i in range(n) if f"{i}.npy" not in names]
    if not n or missing:
      first = f"{missing[0]}.npy is missing" if missing else "it holds no .npy file"
      raise ValueError(f"{field}: {first}; expected caption features 0.npy .. N-1.npy")
    self.paths = [self.folder / f"{i}.npy" for i in range(n)]
    t, c = cfg.cls_token_num, cfg.caption_dim
    for file in self.paths:  # Headers only: a wrong file fails here, before any compile.
      with file.open("rb") as f:
        try:
          version = np.lib.format.read_magic(f)
          read = {(1, 0): np.lib.format.read_array_header_1_0}
          shape, _, dtype = read.get(version, np.lib.format.read_array_header_2_0)(f)
        except ValueError:
          shape, dtype = None, None
      if (
        shape is None
        or len(shape) != 3
        or shape[0] != 1
        or not 1 <= shape[1] <= t
        or shape[2] != c
        or dtype.kind != "f"
      ):
        raise ValueError(
          f"caption features {file} of shape {shape} ({dtype}); expected float (1, L, "
          f"model.caption_dim={c}) with 1 <= L <= model.cls_token_num={t}"
        )
    self.what = {"caption_features": _absolute(path), "count": n}
    self.names = [f"caption {i} ({i}.npy)" for i in range(n)]

  def __len__(self) -> int:
    return len(self.paths)

  def features(self, index: np.ndarray):
    """Captions [index] -> (left-padded features, mask) as the sampler takes them."""
    rows = []
    for i in index:
      with self.paths[int(i)].open("rb") as f:
        rows.append(np.load(f)[0].astype(np.float32))
    return rows


class _Prompts:
  """sample.prompts (one prompt a line), encoded on the mesh by the T5 folder
  sample.text_encoder."""

  def __init__(self, s, cfg: gpt.GPTConfig):
    from npp_jax import text
    from npp_jax import text_encoder

    self.prompts = text.read_prompts(s.prompts)
    folder = text_encoder.check_folder(s.text_encoder, "sample.text_encoder")
    if folder.config.d_model != cfg.caption_dim:
      raise ValueError(
        f"sample.text_encoder {s.text_encoder} gives {folder.config.d_model} features per token "
        f"but model.caption_dim={cfg.caption_dim}; expected the encoder the model was trained with"
      )
    self.folder, self.encoder = s.text_encoder, None
    self.what = {"prompts": self.prompts}
    self.names = self.prompts

  def __len__(self) -> int:
    return len(self.prompts)

  def start(self, mesh, axis_rules, length: int) -> None:
    """Loads the encoder's weights onto the mesh (after every check)."""
    from npp_jax import text_encoder

    self.encoder = text_encoder.TextEncoder(self.folder, mesh, axis_rules, max_length=length)

  def features(self, index: np.ndarray):
    # Every process encodes the same captions (the whole batch, one shape: one compile); the
    # encoder returns every process's rows in process order, so the first len(index) are these.
    out = self.encoder([self.prompts[int(i)] for i in index])
    if out.truncated:
      logging.info(
        "%d prompts longer than %d tokens were cut.", out.truncated, out.features.shape[1]
      )
    return [f[:n] for f, n in zip(out.features[: len(index)], out.lengths[: len(index)])]


def _check_captions(s, cfg: gpt.GPTConfig):
  return _Prompts(s, cfg) if s.prompts else _FeatureFolder(s.caption_features, cfg)


CAPTION_STRIP = 14  # Pixels of caption text under each row of the text grid.


def _write_caption_grid(path: epath.Path, images_of, job: Plan) -> None:
  """PNG, one caption per row: the first grid_rows captions, each with up to grid_cols of its
  images and its prompt (or feature file) written under them."""
  from PIL import Image
  from PIL import ImageDraw

  rows = min(job.settings.grid_rows, len(job.captions))
  cols = min(job.settings.grid_cols, job.images_per_caption)
  picks = [
    np.arange(r * job.images_per_caption, r * job.images_per_caption + cols) for r in range(rows)
  ]
  cells = images_of(np.concatenate(picks))
  h, w = cells.shape[1:3]
  step = h + CAPTION_STRIP
  grid = Image.new("RGB", (cols * w, rows * step), "white")
  draw = ImageDraw.Draw(grid)
  for r in range(rows):
    for c in range(cols):
      grid.paste(Image.fromarray(cells[r * cols + c]), (c * w, r * step))
    name = job.captions.names[r]
    chars = max(4, cols * w // 6)  # The default bitmap font is ~6 px a character.
    label = name if len(name) <= chars else name[: chars - 3] + "..."
    draw.text((2, r * step + h + 1), label, fill="black")
  files.atomic_write(str(path), lambda f: grid.save(f, format="PNG"))
  # The whole captions, which a row's strip may cut: row r of the PNG is line r.
  listing = "".join(f"{job.captions.names[r]}\n" for r in range(rows))
  files.atomic_write(str(path.with_suffix(".txt")), lambda f: f.write(listing.encode("utf-8")))


def _write_grid(path: epath.Path, images_of, labels: np.ndarray, plan: Plan) -> None:
  """PNG, one class per row: row r shows the first images of the r-th class sampled (sample.classes,
  or all classes in order), at most grid_rows rows of grid_cols images."""
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


def run(config: ml_collections.ConfigDict, workdir: str, *, params=None) -> jobs.Result:
  """Samples config.sample.num_images images (or codes) into WORKDIR/samples, and scores them when
  evaluate.reference is set; outputs: "samples" (the merged .npz) and, scored, "metrics".

  One shard file per global batch, written atomically, so a killed run resumes where it stopped.
  Every setting is checked, and the scoring inputs loaded, before anything compiles or is written.
  `params` (GPT parameters) replaces loading sample.checkpoint (tests, notebooks).
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
  sampler = sampling.Sampler(plan.model, s.samples.sampling, mesh, sharding.axis_rules(config.mesh))
  merged = _run_job(plan, sampler, params, vq_params)
  outputs = {"samples": str(merged)}
  if inputs is not None:
    images = image_sets.open_npz_images(merged, "the samples")
    outputs["metrics"] = scores.evaluate(images, inputs, plan.score, mesh, workdir)
  return jobs.Result(outputs=outputs)


def _run_job(job: Plan, sampler: sampling.Sampler, params, vq_params) -> epath.Path:
  """Samples the shards not on disk yet, then the merged .npz and the PNG grid (process 0 writes
  them)."""
  store = job.shards
  # Placed once for the whole job, split as config.mesh splits training's weights: every batch
  # reuses the same device copies. On several processes each fills its own devices' shards; each
  # process samples its devices' share of every batch.
  rep = sharding.replicated(sampler.mesh)
  params = sampler.place_params(params)
  if vq_params is not None:
    vq_params = sharding.put(vq_params, rep)
  s = job.settings.samples
  rng = sharding.put(jax.random.key(int(s.seed)), rep)
  todo = store.start(job.meta, "Resuming: %d of %d samples already in %s.")
  store.write(todo, _sample_shards(job, sampler, params, vq_params, rng, todo), "sampling")
  merged = job.out_dir / f"samples_{job.num_images}.npz"
  if jax.process_index() == 0 and (todo or not merged.exists()):
    _write_outputs(job, merged, vq_params is not None)
  store.finish("npp_jax.jobs.sample.run")  # Nobody returns a path before it is written.
  return merged


def _sample_shards(job: Plan, sampler: sampling.Sampler, params, vq_params, rng, todo):
  """The arrays of each shard in `todo`: codes and labels (text: caption_index), and images with a
  VQ."""
  cfg, bs, spans = job.model, job.settings.samples.batch_size, job.shards.spans
  if isinstance(job.captions, _Prompts) and todo:
    job.captions.start(sampler.mesh, sampler.rules, cfg.cls_token_num)
  for i in todo:
    a, b = spans[i]
    indices = np.arange(a, a + bs)  # Padded to bs past the end.
    if job.captions is None:
      labels = job.settings.samples.labels(indices, cfg.num_classes)
      codes = sampler.sample(params, labels, rng, first_index=a)
      out = {"codes": sharding.gather(codes)[: b - a], "labels": labels[: b - a]}
    else:
      index = job.caption_index(indices)
      cond = sampling.left_pad(job.captions.features(index), cfg.cls_token_num)
      codes = sampler.sample(params, cond, rng, first_index=a)
      out = {"codes": sharding.gather(codes)[: b - a], "caption_index": index[: b - a]}
    if vq_params is not None:
      out["arr_0"] = sampling.decode_images(vq_params, out["codes"], job.vq_cfg, sampler.mesh)
    yield out


def _write_outputs(job: Plan, merged: epath.Path, images: bool) -> None:
  """The merged .npz of every shard and, with images, the PNG grid of the first samples per
  class."""
  store = job.shards
  paths = [store.path(i) for i in range(len(store.spans))]
  _merge(merged, paths, job.num_images)
  if images:
    bs = job.settings.samples.batch_size

    def images_of(indices):
      shards = {}
      for j in sorted(set(int(i) // bs for i in indices)):  # Each shard read once.
        with paths[j].open("rb") as f, np.load(f) as z:
          shards[j] = z["arr_0"]
      return np.stack([shards[i // bs][i % bs] for i in indices])

    png = job.out_dir / f"samples_{job.num_images}.png"
    if job.captions is not None:
      _write_caption_grid(png, images_of, job)
    else:
      all_labels = job.settings.samples.labels(np.arange(job.num_images), job.model.num_classes)
      _write_grid(png, images_of, all_labels, job)
  logging.info("Wrote %d %s to %s.", job.num_images, "images" if images else "code grids", merged)
