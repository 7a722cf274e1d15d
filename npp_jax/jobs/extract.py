"""Extraction: one split of a data set's images -> a code data set (npp_jax.data.code_dataset), with
the release's views.

  python -m npp_jax.main --mode=extract --config=configs/b.py --workdir=W \
      --config.extract.vq_checkpoint=/ckpt/vq16 --config.extract.data_dir=/data/tfds   # -> W/codes

With extract.captions (LlamaGen's image + caption index) and extract.text_encoder (a T5 folder), a
caption code data set instead (npp_jax.data.captions; extract_captions below), on the same shards.

Each global batch of extract.batch_size images becomes a shard
WORKDIR/extract_tmp/<split>/shard_*.npz as soon as it is encoded; a re-run encodes only missing
shards, then streams them into the data set. On several processes every process reads, crops and
encodes its rows of each batch; the codes are gathered and process 0 alone writes (the shards, then
the data set), so the result is the one-process result.
"""

import dataclasses
import time
from typing import Any, Iterator, Optional

from absl import logging
from etils import epath
from etils import epy
import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np

from npp_jax import checkpoints
from npp_jax import files
from npp_jax import jobs
from npp_jax import preflight
from npp_jax import rules
from npp_jax import sharding
from npp_jax import shards
from npp_jax.data import code_dataset
from npp_jax.data import images as images_lib
from npp_jax.models import gpt
from npp_jax.models import vq

# grain (and orbax under it) loads at first use: a bad command line fails without it.
with epy.lazy_imports():
  import grain


def encode_views(params, views: np.ndarray, cfg: vq.VQConfig, mesh) -> np.ndarray:
  """This process's uint8 views [L, n_aug, S, S, 3] -> codes [P * L, n_aug, h, w] of all processes'
  rows.

  One view index at a time, so memory follows the batch size, not batch size x n_aug.
  """
  batch = sharding.data_sharding(mesh)
  codes = [
    vq.encode_fn(
      params, jax.make_array_from_process_local_data(batch, np.ascontiguousarray(views[:, a])), cfg
    )
    for a in range(views.shape[1])
  ]
  return sharding.gather(jnp.stack(codes, axis=1))


def rows(
  config, batch_size: int, process_count: int | None = None, num_devices: int | None = None
) -> tuple[int, int]:
  """(images each process reads per batch, rows it feeds the devices): the rows are padded up to a
  multiple of the process's data-parallel devices, so any batch size works on any mesh."""
  procs = jax.process_count() if process_count is None else process_count
  dp = sharding.data_parallel_size(config.mesh, num_devices)
  if batch_size % procs:
    raise ValueError(
      f"extract.batch_size={batch_size}; expected a multiple of the {procs} processes"
    )
  if dp % procs:
    raise ValueError(
      f"mesh.shape={tuple(config.mesh.shape)} has a data-parallel size {dp} that the {procs} "
      "processes cannot share; expected data x fsdp to be a multiple of the process count"
    )
  local, per = batch_size // procs, dp // procs
  return local, -(-local // per) * per


def process_share(
  shard: int, batch_size: int, num_examples: int, process_index: int, local: int
) -> tuple[int, int]:
  """[start, stop) of the examples one process reads and encodes of a shard: the shard's rows cut
  into equal consecutive parts, one per process (empty past the end of the data set)."""
  start = min(shard * batch_size + process_index * local, num_examples)
  return start, min(start + local, num_examples)


def merge_rows(
  ids: np.ndarray, codes: np.ndarray, labels: np.ndarray, start: int, count: int
) -> tuple[np.ndarray, np.ndarray]:
  """Rows gathered from every process's devices (in the mesh's device order, padding rows with id
  -1)
  -> the codes and labels of examples start .. start + count - 1, in order."""
  keep = ids >= 0
  order = np.argsort(ids[keep], kind="stable")
  got = ids[keep][order]
  if not np.array_equal(got, np.arange(start, start + count)):
    raise RuntimeError(
      f"extraction gathered examples {got[:8].tolist()}... for a shard of examples "
      f"[{start}, {start + count}): the processes did not share the shard"
    )
  return codes[keep][order], labels[keep][order]


# ------------------------------------------------------------------------------- settings and check

SECTIONS = ("extract", "vq", "model", "mesh")


@dataclasses.dataclass(frozen=True)
class ExtractSettings:
  """config.extract."""

  dataset: str  # "digits", a TFDS name or directory, an image folder.
  data_dir: str
  split: str
  aug: str  # A key of data.images.AUGS: the views per image.
  crop_range: float  # tencrop: the short side is resized to crop_range x the image size.
  batch_size: int  # Images per global batch (one shard file each).
  output: str  # "": WORKDIR/codes.
  keep_shards: bool
  num_threads: int
  vq_checkpoint: str

  def __post_init__(self):
    rules.check_fields(self, "extract", _RULES)

  @classmethod
  def from_config(cls, config) -> "ExtractSettings":
    return cls(**rules.section(config, "extract", cls))

  @property
  def n_aug(self) -> int:
    return images_lib.AUGS[self.aug]


_RULES = {
  "dataset": rules.NON_EMPTY,
  "data_dir": rules.TEXT,
  "split": rules.SPLIT,
  "aug": rules.one_of(*images_lib.AUGS),
  "crop_range": (
    "a number >= 1 and at most 2 (the release: 1.1 or 1.05)",
    lambda v: rules.is_num(v) and 1 <= v <= 2,
  ),
  "batch_size": rules.POSITIVE_INT,
  "output": rules.TEXT,
  "keep_shards": rules.BOOL,
  "num_threads": rules.COUNT,
  "vq_checkpoint": rules.TEXT,
}


@dataclasses.dataclass(frozen=True)
class Settings:
  extract: ExtractSettings
  vq: vq.VQConfig
  model: gpt.GPTConfig  # The codes' consumer: its grid, vocabulary and classes.
  mesh: sharding.MeshSettings


def check_settings(config, topology: jobs.Topology) -> Settings:
  """Every rule of the sections extraction reads, and the batch against the processes' devices."""
  s = Settings(
    ExtractSettings.from_config(config),
    vq.VQConfig.from_config(rules.get(config, "vq")),
    gpt.GPTConfig.from_config(rules.get(config, "model")),
    sharding.MeshSettings.from_config(config),
  )
  preflight.check_vq_fits(s.vq, s.model)
  rows(config, s.extract.batch_size, topology.process_count, topology.num_devices)
  return s


def _output(s: ExtractSettings, workdir) -> tuple[str, epath.Path]:
  field = "extract.output" if s.output else 'extract.output ("": WORKDIR/codes)'
  return field, epath.Path(s.output or epath.Path(workdir) / "codes")


def check(config, workdir, topology: jobs.Topology) -> Settings:
  """Every setting, the workdir, the VQ weights' kind and the output's place: one-line ValueErrors,
  nothing loaded or written (the source and the output's own settings are checked by `run`, still
  before it writes: a data set's header needs TFDS)."""
  preflight.check_workdir(workdir)
  s = check_settings(config, topology)
  code_dataset.check_local(*_output(s.extract, workdir))
  preflight.expect_weights(
    "extract.vq_checkpoint", s.extract.vq_checkpoint, preflight.VQ_KINDS, preflight.VQ_WANTED
  )
  if rules.get(config, "extract").get("captions"):  # The index read whole, the T5 folder's files.
    CaptionExtractSettings.from_config(config)
  return s


@dataclasses.dataclass
class _Job:
  """What the checks decided; `finished` is set when the split exists already (nothing to do)."""

  config: Any
  cfg: vq.VQConfig
  split: str
  n_aug: int
  batch_size: int
  output: epath.Path
  tmp_dir: epath.Path
  finished: Optional[dict] = None
  source: Any = None
  params: Any = None
  settings: Optional[dict] = None  # What fixes the shards' content (tmp_dir/settings.json).


def _settings(e: ExtractSettings, cfg: vq.VQConfig, source) -> dict:
  return {
    "dataset": source.name,
    "data_dir": e.data_dir,
    "split": e.split,
    "aug": e.aug,
    "crop_range": float(e.crop_range) if e.aug == "tencrop" else None,
    "batch_size": e.batch_size,
    "image_size": cfg.image_size,
    "codebook_size": cfg.codebook_size,
    "vq_checkpoint": str(files.absolute(e.vq_checkpoint)),
    "num_examples": source.num_examples,
  }


def _plan(config, workdir, source) -> _Job:
  """check, then the output's settings, the source and the VQ parameters, before any compile or
  write."""
  s = check(config, workdir, jobs.Topology.current())
  e, cfg = s.extract, s.vq
  output = _output(e, workdir)[1]
  tmp_dir = epath.Path(workdir) / "extract_tmp" / e.split
  job = _Job(config, cfg, e.split, e.n_aug, e.batch_size, output, tmp_dir)
  existing = files.read_json(output / "code_dataset.json")  # The finished splits' record.
  if existing is not None:
    job.finished = existing.get("splits", {}).get(e.split)
    if job.finished:
      return job
    want = {
      "grid": list(cfg.grid),
      "n_aug": e.n_aug,
      "vocab_size": cfg.codebook_size,
      "num_classes": s.model.num_classes,
    }
    diff = [
      f"{k}={existing.get(k)} there, {v} now" for k, v in want.items() if existing.get(k) != v
    ]
    if diff:
      raise ValueError(
        f"code data set {output} was made with other settings ({'; '.join(diff)}); expected "
        "the same, or another extract.output"
      )
  job.source = source or images_lib.open_images(e.dataset, e.split, e.data_dir, "extract.dataset")
  if job.source.num_classes > s.model.num_classes:
    raise ValueError(
      f"{job.source.name} has {job.source.num_classes} classes; expected at most "
      f"model.num_classes={s.model.num_classes}"
    )
  job.params = checkpoints.load_vq_params(e.vq_checkpoint, config.vq)
  job.settings = _settings(e, cfg, job.source)
  _shards(job).check_settings(
    job.settings, "shards", f"expected the same settings, or delete {job.tmp_dir}"
  )
  return job


# ---------------------------------------------------------------------------------------------- run


def run(config: ml_collections.ConfigDict, workdir: str, *, source=None) -> jobs.Result:
  """Encode one split of images into a code data set at extract.output (default WORKDIR/codes).

  A split that is already finished there is left alone. Outputs: a summary (examples, shards encoded
  and reused, images/s). `source` (an images.ImageSource) replaces opening extract.dataset
  (benchmarks, notebooks with images in memory).
  """
  if rules.get(config, "extract").get("captions"):
    return jobs.Result(outputs=extract_captions(config, workdir))
  return jobs.Result(outputs=_extract(config, workdir, source))


def _extract(config, workdir, source) -> dict:
  job = _plan(config, workdir, source)
  summary = {
    "output": str(job.output),
    "split": job.split,
    "n_aug": job.n_aug,
    "shards_encoded": 0,
    "shards_reused": 0,
  }
  if job.finished:
    logging.info(
      "Split %r of %s already exists (%d examples); nothing to extract.",
      job.split,
      job.output,
      job.finished["num_examples"],
    )
    print(f"extract: split '{job.split}' of {job.output} already exists; skipping", flush=True)
    return {**summary, "num_examples": job.finished["num_examples"], "skipped": True}
  store = _shards(job)
  todo = store.start(job.settings)
  num_shards, done = len(store.spans), len(store.spans) - len(todo)
  logging.info(
    "Extracting %s split %r: %d images x %d views (%s), %d shards of %d, %d already done.",
    job.source.name,
    job.split,
    job.source.num_examples,
    job.n_aug,
    config.extract.aug,
    num_shards,
    job.batch_size,
    done,
  )
  encoded, elapsed = _encode(job, store, todo)
  summary["shards_encoded"] = len(todo)
  summary["shards_reused"] = done
  summary["images_per_s"] = encoded / elapsed if encoded else None
  if encoded:
    logging.info(
      "Encoded %d images (%d views each) in %.1f s: %.1f images/s.",
      encoded,
      job.n_aug,
      elapsed,
      encoded / elapsed,
    )
  if jax.process_index() == 0:
    _write_dataset(job, store)
  store.finish("npp_jax.jobs.extract")
  return {**summary, "num_examples": job.source.num_examples, "skipped": False}


def _shards(job: _Job) -> shards.Shards:
  """One shard per global batch of the split: shard_000000.npz ... and settings.json in tmp_dir."""
  return shards.Shards(
    job.tmp_dir, job.source.num_examples, job.batch_size, "settings.json", by_index=True
  )


def _views(
  job: _Job, todo: list[int], local: int, device_rows: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """(uint8 views [device_rows, n_aug, S, S, 3], (example id, label) int32 [device_rows, 2]) of this
  process's rows of each shard in `todo`, prepared one shard ahead on grain's threads (host work
  overlaps the device's)."""
  e, n, size = job.config.extract, job.source.num_examples, job.cfg.image_size
  threads = images_lib.num_threads(e.num_threads)

  def prepare(i: int):
    start, stop = process_share(i, job.batch_size, n, jax.process_index(), local)
    views = np.zeros(
      (device_rows, job.n_aug, size, size, 3), np.uint8
    )  # Rows past the end: padding.
    meta = np.full((device_rows, 2), -1, np.int32)  # (example id, label); id -1: a padding row.
    if stop > start:
      images, got = job.source.read(start, stop)
      views[: stop - start] = np.stack(
        images_lib.parallel_map(
          lambda im: images_lib.augment(images_lib.to_rgb(im), e.aug, size, e.crop_range),
          images,
          threads,
        )
      )
      meta[: stop - start] = np.stack([np.arange(start, stop), got], axis=1)
    return views, meta

  if not todo:
    return
  # One reading thread: sources read in order (an image folder is one forward pass).
  ds = grain.MapDataset.source(todo).map(prepare)
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))
  try:
    yield from it
  finally:
    it.close()


def _encode(job: _Job, store: shards.Shards, todo: list[int]) -> tuple[int, float]:
  """Encode the shards in `todo`, process 0 writing each as it is done; (images encoded,
  seconds)."""
  local, device_rows = rows(job.config, job.batch_size)
  mesh = sharding.make_mesh(job.config.mesh)
  params = sharding.put(job.params, sharding.replicated(mesh))  # Works on several processes too.
  code_dtype = np.uint16 if job.cfg.codebook_size <= 2**16 else np.int32

  def encoded(views):
    for i, (v, meta) in zip(todo, views):
      codes = encode_views(params, v, job.cfg, mesh)
      meta = sharding.gather(
        jax.make_array_from_process_local_data(sharding.data_sharding(mesh), meta)
      )
      a, b = store.spans[i]
      codes, labels = merge_rows(meta[:, 0], codes, meta[:, 1], a, b - a)
      yield {"codes": codes.astype(code_dtype), "labels": labels}

  t0 = time.perf_counter()
  views = _views(job, todo, local, device_rows)
  try:
    store.write(todo, encoded(views), f"extract {job.split}")
  finally:
    views.close()
  return store.size(todo), time.perf_counter() - t0


def _write_dataset(job: _Job, store: shards.Shards) -> None:
  """The code data set from the shards in order; the shards are deleted unless
  extract.keep_shards."""
  with code_dataset.CodeDatasetWriter(
    str(job.output),
    job.cfg.grid,
    job.n_aug,
    job.cfg.codebook_size,
    job.config.model.num_classes,
    split=job.split,
    overwrite=True,
  ) as writer:  # Replaces only an unfinished split.
    for i in range(len(store.spans)):
      shard = store.read(i)
      writer.add(shard["codes"], shard["labels"])
  if not job.config.extract.keep_shards:
    job.tmp_dir.rmtree()
    if not any(job.tmp_dir.parent.iterdir()):
      job.tmp_dir.parent.rmdir()
  logging.info(
    "Wrote split %r of %s: %d examples, %d views each.",
    job.split,
    job.output,
    job.source.num_examples,
    job.n_aug,
  )


# ------------------------------------------------------------------------------------ caption codes

TEXT_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class CaptionExtractSettings:
  """extract.captions / caption_key / caption_index / text_encoder / text_dtype, checked: the index
  read whole (a bad line is found before any compile), the T5 folder's files and config."""

  index: str
  entries: tuple  # caption_index.Entry of every line, in order.
  folder: Any  # text_encoder.T5Folder
  text_dtype: str

  @classmethod
  def from_config(cls, config) -> Optional["CaptionExtractSettings"]:
    """None without extract.captions (class extraction); one-line ValueErrors."""
    from npp_jax import text_encoder
    from npp_jax.data import caption_index

    e = config.extract
    if not e.get("captions"):
      return None
    if not isinstance(e.captions, str):
      raise ValueError(f"extract.captions={e.captions!r}; expected the path of a .jsonl index")
    if not isinstance(e.caption_key, str) or not e.caption_key:
      raise ValueError(f"extract.caption_key={e.caption_key!r}; expected a field name")
    if not isinstance(e.caption_index, int) or isinstance(e.caption_index, bool):
      raise ValueError(f"extract.caption_index={e.caption_index!r}; expected an integer")
    if e.text_dtype not in TEXT_DTYPES:
      raise ValueError(f"extract.text_dtype={e.text_dtype!r}; expected one of {TEXT_DTYPES}")
    if not e.text_encoder:
      raise ValueError(
        "extract.text_encoder is empty; expected a Hugging Face T5 folder (config.json, "
        "spiece.model, weights) to encode the captions of extract.captions"
      )
    folder = text_encoder.check_folder(
      e.text_encoder, "extract.text_encoder", dtype=e.text_dtype, param_dtype=e.text_dtype
    )
    dim = config.model.get("caption_dim")
    if config.model.get("condition") == "text" and dim != folder.config.d_model:
      raise ValueError(
        f"extract.text_encoder {e.text_encoder} gives {folder.config.d_model}-wide features but "
        f"model.caption_dim={dim}; expected the same width"
      )
    entries = caption_index.read_index(e.captions, e.caption_key, e.caption_index)
    return cls(str(e.captions), tuple(entries), folder, e.text_dtype)

  def record(self) -> dict:
    """What makes the shards: a resumed run with other settings is refused."""
    return {
      "captions": str(files.absolute(self.index)),
      "caption_lines": len(self.entries),
      "text_encoder": str(files.absolute(self.folder.path)),
      "text_dtype": self.text_dtype,
    }


def extract_captions(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Encode the images and captions of extract.captions into a caption code data set at
  extract.output (default WORKDIR/codes), one shard per global batch in
  WORKDIR/extract_tmp/<split>, resumable as the class extraction. Returns a summary (examples,
  skipped images, truncated captions, shards encoded and reused)."""
  from npp_jax import caption_codes
  from npp_jax import text_encoder
  from npp_jax.data import captions

  s = check(config, workdir, jobs.Topology.current())
  text = CaptionExtractSettings.from_config(config)
  cfg, n_aug, batch_size, split = s.vq, s.extract.n_aug, s.extract.batch_size, s.extract.split
  e = config.extract
  output = epath.Path(e.output or epath.Path(workdir) / "codes")
  summary = {"output": str(output), "split": split, "n_aug": n_aug}
  existing = files.read_json(output / "code_dataset.json")
  if existing is not None:
    if existing.get("kind", "class") != captions.KIND:
      raise ValueError(
        f"extract.output {output} holds a {existing.get('kind', 'class')} code data set; "
        "expected a caption one, or another extract.output"
      )
    done = existing.get("splits", {}).get(split)
    if done:
      print(f"extract: split '{split}' of {output} already exists; skipping", flush=True)
      return {**summary, "num_examples": done["num_examples"], "skipped": True}
  params = checkpoints.load_vq_params(e.vq_checkpoint, config.vq)
  mesh = sharding.make_mesh(config.mesh)
  encoder = text_encoder.TextEncoder(
    text.folder.path,
    mesh,
    sharding.axis_rules(config.mesh),
    dtype=text.text_dtype,
    param_dtype=text.text_dtype,
    field="extract.text_encoder",
  )
  tmp_dir = epath.Path(workdir) / "extract_tmp" / split
  store = shards.Shards(tmp_dir, len(text.entries), batch_size, "settings.json", by_index=True)
  record = {
    **text.record(),
    "split": split,
    "aug": e.aug,
    "crop_range": float(e.crop_range) if e.aug == "tencrop" else None,
    "batch_size": batch_size,
    "image_size": cfg.image_size,
    "codebook_size": cfg.codebook_size,
    "vq_checkpoint": str(files.absolute(e.vq_checkpoint)),
  }
  store.check_settings(record, "shards", f"expected the same settings, or delete {tmp_dir}")
  todo = store.start(record, "Resuming caption extraction: %d of %d lines done in %s.")
  summary.update(shards_encoded=len(todo), shards_reused=len(store.spans) - len(todo))
  views = caption_codes.Views(
    e.aug, cfg.image_size, e.crop_range, images_lib.num_threads(e.num_threads)
  )
  params = sharding.put(params, sharding.replicated(mesh))
  store.write(
    todo,
    _caption_shards(text.entries, store, todo, config, params, cfg, encoder, views),
    f"extract {split}",
  )
  counts = {"num_examples": len(text.entries), "skipped_images": 0, "truncated_captions": 0}
  if jax.process_index() == 0:
    with captions.CaptionDatasetWriter(
      str(output),
      cfg.grid,
      n_aug,
      cfg.codebook_size,
      text.folder.config.d_model,
      max_length=encoder.max_length,
      split=split,
      overwrite=True,
    ) as writer:  # Replaces only an unfinished split.
      for i, (a, b) in enumerate(store.spans):
        shard = store.read(i)
        texts = [entry.caption for entry in text.entries[a:b]]
        feats = shard["caption"].view(ml_dtypes.bfloat16)
        writer.add(shard["codes"], feats, shard["caption_len"], texts, shard["valid"])
        counts["skipped_images"] += int((~shard["valid"]).sum())
        counts["truncated_captions"] += int(shard["truncated"])
    if not e.keep_shards:
      tmp_dir.rmtree()
      if not any(tmp_dir.parent.iterdir()):
        tmp_dir.parent.rmdir()
    print(
      f"extract: {counts['num_examples']} lines of {text.index} -> split '{split}' of {output}; "
      f"{counts['skipped_images']} images unreadable or smaller than {cfg.image_size} px (kept "
      f"as invalid examples), {counts['truncated_captions']} captions cut to "
      f"{encoder.max_length} tokens",
      flush=True,
    )
  store.finish("npp_jax.jobs.extract.captions")
  return {**summary, **counts, "skipped": False}


def _caption_shards(entries, store, todo, config, params, cfg, encoder, views):
  """Each shard of `todo` encoded (a collective: every process its share of the lines): its
  codes, bf16 features (as uint16 bits: .npz has no bfloat16) cut to its longest caption, lengths,
  valid flags and truncated count."""
  from npp_jax import caption_codes

  _, device_rows = rows(config, store.batch_size)
  mesh = encoder.mesh
  code_dtype = np.uint16 if cfg.codebook_size <= 2**16 else np.int32
  for i in todo:
    a, b = store.spans[i]
    mine = caption_codes.process_share(a, b, jax.process_index(), jax.process_count())
    batch = caption_codes.encode_batch(
      [entries[j] for j in mine],
      np.arange(mine.start, mine.stop),
      device_rows,
      encode_views=lambda v: encode_views(params, v, cfg, mesh),
      encoder=encoder,
      views=views,
    )
    got = caption_codes.in_order(batch, a, b - a)
    longest = max(1, int(got["caption_len"].max()))
    yield {
      "codes": got["codes"].astype(code_dtype),
      "caption": got["caption"][:, :longest].astype(ml_dtypes.bfloat16).view(np.uint16),
      "caption_len": got["caption_len"].astype(np.int32),
      "valid": got["valid"],
      "truncated": np.int64(batch["truncated"]),
    }
