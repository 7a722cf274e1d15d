"""The code data set: VQ code grids of images with their class labels, written once, read every
epoch.

On disk it is a TFDS data set in array_record format (random access, no TensorFlow at read time)
plus `code_dataset.json`, our own small record of what the arrays mean and which splits are
complete:

  out_dir/
    dataset_info.json  features.json          TFDS metadata (splits, shard lengths, feature spec)
    npp_codes-{split}.array_record-{shard}    one record per image: codes [n_aug, h, w], label
    code_dataset.json                         grid, n_aug, vocab_size, num_classes, per split its
    size,
                                              max code and max label; a split is listed once
                                              finalized

Writing: `write_code_dataset` for arrays in memory, `CodeDatasetWriter` for jobs that produce codes
as they go (code extraction); npp_jax.npy_codes converts the PyTorch LlamaGen release's per-image
.npy files. Other kinds of examples (npp_jax.data.captions: codes with caption features) reuse
`SplitWriter`, `train_iterator` and `eval_iterator` with their own features and row reader;
code_dataset.json names their kind ("kind", absent for class data sets) and each reader refuses the
other kind.

Reading: `make_train_iterator` is an infinite grain iterator of local batches, one fresh shuffle and
one random augmentation per image per epoch, remainder dropped, global batches split across
processes; its state (JSON; {"next_index": steps consumed} without worker processes) restores it
exactly. `make_eval_iterator` is one ordered pass.
"""

from __future__ import annotations  # Annotations name grain and tfds types without loading them.

import dataclasses
import json
import os
from typing import Any, Optional, Sequence

from absl import flags
from etils import epath
from etils import epy
import numpy as np

from npp_jax import files
from npp_jax import rules

with epy.lazy_imports():  # Loaded at first use: a settings check fails in a second without them.
  import grain
  import tensorflow_datasets as tfds

_NAME = "npp_codes"  # TFDS data set name: the prefix of every shard file.
_VERSION = "1.0.0"
_META_FILE = "code_dataset.json"
_FORMAT = 1
_SHARD_BYTES = (
  64 << 20
)  # Shard size the writer aims for: large enough for few files, small enough to spread.


@dataclasses.dataclass(frozen=True)
class CodeDatasetMetadata:
  num_examples: int
  grid: tuple[int, int]
  n_aug: int
  vocab_size: int
  num_classes: int
  max_code: int
  max_label: int


def check_local(field: str, path) -> None:
  """Code data sets are array_record files, which array_record's C++ reader and writer open
  natively: a gs:// (any scheme) path fails there, after the whole extraction or at the first
  batch."""
  if "://" in str(path):
    raise ValueError(
      f"{field}={str(path)!r} is a {str(path).split('://')[0]}:// path; code data sets "
      "(array_record) need a local or FUSE-mounted directory (e.g. a bucket mounted with "
      "gcsfuse)"
    )


@dataclasses.dataclass(frozen=True)
class DataSettings:
  """config.data: where the trainer reads its code data set and how."""

  path: str  # "" until set; the trainer requires it (the demo makes its own).
  worker_count: int
  shuffle_seed: int
  eval_split: str  # "": "test" or else "validation", whichever the data set has.

  def __post_init__(self):
    rules.check_fields(self, "data", _DATA_RULES)
    check_local("data.path", self.path)

  @classmethod
  def from_config(cls, config) -> DataSettings:
    return cls(**rules.section(config, "data", cls))


_DATA_RULES = {
  "path": rules.TEXT,
  "worker_count": rules.COUNT,
  "shuffle_seed": rules.INT,
  "eval_split": ("'' or " + rules.SPLIT[0], lambda v: v == "" or rules.SPLIT[1](v)),
}


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
  """Full global batches in one epoch; the remainder of every epoch is dropped."""
  return num_examples // global_batch_size


# --------------------------------------------------------------------------------------------------
# Writing.


def code_dtype(vocab_size: int) -> np.dtype:
  # Raw bytes of the narrowest type: ImageNet with ten-crop x flip is ~13 GB as uint16, twice that
  # as int32.
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def _features(grid, n_aug, vocab_size) -> tfds.features.FeaturesDict:
  # BYTES encoding: a frombuffer at read time instead of an int64 varint list (twice as fast both
  # ways).
  return tfds.features.FeaturesDict(
    {
      "codes": tfds.features.Tensor(
        shape=(n_aug, *grid), dtype=code_dtype(vocab_size), encoding=tfds.features.Encoding.BYTES
      ),
      "label": tfds.features.Tensor(shape=(), dtype=np.int32),
    }
  )


def check_grid(grid) -> tuple[int, int]:
  try:
    h, w = (int(g) for g in grid)
  except (TypeError, ValueError):
    raise ValueError(f"grid must be (h, w), got {grid!r}") from None
  if h < 1 or w < 1:
    raise ValueError(f"grid must be two positive integers (h, w), got {grid!r}")
  return h, w


def as_examples(
  codes, labels, *, vocab_size: int, num_classes: int, where=lambda i: f"at example {i}"
):
  """Checked (codes [N, n_aug, h, w] int64, labels [N] int64); a one-line ValueError for the first
  fault.

  `where(i)` names example i in the message: its index in the split, or the file it came from.
  """
  codes, labels = np.asarray(codes), np.asarray(labels)
  if codes.ndim not in (3, 4):
    raise ValueError(f"codes must be [N, n_aug, h, w] or [N, h, w], got shape {codes.shape}")
  if codes.ndim == 3:
    codes = codes[:, None]
  if codes.shape[0] == 0:
    raise ValueError(f"no examples: codes has shape {codes.shape}, expected N > 0")
  if min(codes.shape[1:]) == 0:
    raise ValueError(f"codes must have n_aug, h, w > 0, got shape {codes.shape}")
  if labels.shape != (codes.shape[0],):
    raise ValueError(
      f"labels must have shape ({codes.shape[0]},) to match codes, got {labels.shape}"
    )
  for name, x in (("codes", codes), ("labels", labels)):
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{name} must be integers, got dtype {x.dtype}")
  codes, labels = codes.astype(np.int64), labels.astype(np.int64)
  for name, x, bound, bound_name in (
    ("code", codes, vocab_size, "vocab_size"),
    ("label", labels, num_classes, "num_classes"),
  ):
    bad = (x < 0) | (x >= bound)
    if bad.any():
      first = np.unravel_index(int(np.argmax(bad)), x.shape)
      value = int(x[first])
      expected = "< 0" if value < 0 else f">= {bound_name} {bound}"
      raise ValueError(f"{name} {value} {where(int(first[0]))} is {expected}")
  return codes, labels


def _read_meta(path) -> Optional[dict[str, Any]]:
  try:
    return json.loads((epath.Path(path) / _META_FILE).read_text())
  except FileNotFoundError:
    return None


def _write_meta(path, meta: dict[str, Any]) -> None:
  # Write-then-rename, so that a crash never leaves a half-written record of which splits are
  # complete.
  files.atomic_write(
    str(epath.Path(path) / _META_FILE),
    lambda f: f.write(json.dumps(meta, indent=2, sort_keys=True).encode()),
  )


class SplitWriter:
  """What every data set kind writes alike: one split of a TFDS array_record data set with our
  `code_dataset.json` beside it, added to batch by batch and made readable by `finalize()`.

  Use it as a context manager: an exception inside the block removes the partly written split, so a
  failed job leaves the data set as it was. Only one writer may work on a directory at a time (TFDS
  rewrites dataset_info.json on every `add`). Other splits already in `out_dir` are kept; the data
  set's `fields` (grid, n_aug, vocabulary, ...) must match theirs. A kind subclasses it with its
  `add` and the per-split numbers it records (`_split_stats`).
  """

  KIND = "class"  # code_dataset.json's "kind" (absent in class data sets written before kinds).
  TFDS_NAME = _NAME

  def __init__(
    self,
    out_dir: str,
    fields: dict[str, Any],
    features: tfds.features.FeaturesDict,
    description: str,
    *,
    split: str,
    overwrite: bool,
    examples_per_shard: int,
  ):
    self.out_dir = os.fspath(out_dir)  # A str for TFDS; self._dir for our own file work.
    self._dir = epath.Path(self.out_dir)
    self.split = rules.split_name(split)
    self._fields, self._features, self._description = fields, features, description
    examples_per_shard = rules.positive_int(examples_per_shard, "examples_per_shard")
    self._meta = self._open_dataset(overwrite)
    # overwrite=False: TFDS loads the splits already on disk and appends ours beside them.
    self._writer = tfds.core.SequentialWriter(
      ds_info=self._info(),
      max_examples_per_shard=examples_per_shard,
      overwrite=False,
      file_format="array_record",
    )
    self._writer.initialize_splits([self.split])
    self.num_examples = 0
    self._done = False

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=tfds.core.DatasetIdentity(
        name=self.TFDS_NAME, version=_VERSION, data_dir=self.out_dir, module_name=""
      ),
      description=self._description,
      features=self._features,
    )

  def _open_dataset(self, overwrite: bool) -> dict[str, Any]:
    meta = _read_meta(self.out_dir)
    self._made_dir = self._made_dataset = False
    if meta is None:
      if self._dir.is_dir() and any(self._dir.iterdir()):
        raise ValueError(
          f"{self.out_dir} exists and is not a code data set (no {_META_FILE}); "
          f"expected a new or empty directory"
        )
      self._made_dir = not self._dir.is_dir()
      self._made_dataset = True
      self._dir.mkdir(parents=True, exist_ok=True)
      meta = {"format": _FORMAT, **self._fields, "splits": {}}
      if self.KIND != "class":
        meta["kind"] = self.KIND
      _write_meta(self.out_dir, meta)
      return meta
    if meta.get("kind", "class") != self.KIND:
      raise ValueError(
        f"{self.out_dir} is a {meta.get('kind', 'class')} code data set; this writer adds "
        f"{self.KIND} examples"
      )
    for key, want in self._fields.items():
      if meta.get(key) != want:
        raise ValueError(
          f"code data set {self.out_dir} has {key}={meta.get(key)}, the writer was given {want}"
        )
    on_disk = self.split in meta["splits"] or self.split in _tfds_split_names(self.out_dir)
    if on_disk and not overwrite:
      state = "" if self.split in meta["splits"] else " (unfinished: an interrupted write)"
      raise ValueError(
        f"split '{self.split}' already exists in {self.out_dir}{state}; "
        f"pass overwrite=True to replace it"
      )
    if on_disk:
      self._remove_split(meta)
    return meta

  def _remove_split(self, meta: dict[str, Any]) -> None:
    meta["splits"].pop(self.split, None)
    _write_meta(self.out_dir, meta)
    if (self._dir / "dataset_info.json").exists():
      info = self._info()
      info.read_from_directory(self.out_dir)
      info.set_splits(
        tfds.core.SplitDict([s for name, s in info.splits.items() if name != self.split])
      )
      info.write_to_directory(self.out_dir)
    prefix = f"{self.TFDS_NAME}-{self.split}."
    for f in self._dir.iterdir():
      if f.name.startswith(prefix):
        f.unlink()

  def _check_open(self) -> None:
    if self._done:
      raise ValueError(f"split '{self.split}' of {self.out_dir} is already finalized")

  def _add_examples(self, examples: list[dict[str, Any]]) -> None:
    self._writer.add_examples({self.split: examples})
    self.num_examples += len(examples)

  def _split_stats(self) -> dict[str, Any]:
    """What code_dataset.json records of a finished split besides num_examples."""
    return {}

  def finalize(self) -> None:
    self._check_open()
    if self.num_examples == 0:
      self.abort()
      raise ValueError(
        f"no examples were added to split '{self.split}' of {self.out_dir}; expected N > 0"
      )
    self._writer.close_splits([self.split])
    self._meta["splits"][self.split] = {"num_examples": self.num_examples, **self._split_stats()}
    _write_meta(self.out_dir, self._meta)
    self._done = True

  def abort(self) -> None:
    """Drops what this writer wrote; other splits stay."""
    if self._done:
      return
    self._writer.close_splits([self.split])
    self._remove_split(self._meta)
    self._done = True
    if self._made_dataset and not self._meta["splits"]:
      # This writer created the data set: leave the directory as it found it.
      for f in (_META_FILE, "dataset_info.json", "features.json", "metadata.json"):
        (self._dir / f).unlink(missing_ok=True)
      if self._made_dir and not any(self._dir.iterdir()):
        self._dir.rmdir()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self.abort()
    elif not self._done:
      self.finalize()


def shard_size(example_bytes: int, examples_per_shard: Optional[int]) -> int:
  """Examples per shard: as given, or what fills _SHARD_BYTES."""
  if examples_per_shard is None:
    return max(1, _SHARD_BYTES // max(1, example_bytes))
  return examples_per_shard


class CodeDatasetWriter(SplitWriter):
  """Writes one split of a class-conditional code data set (codes and labels); see SplitWriter."""

  def __init__(
    self,
    out_dir: str,
    grid: Sequence[int],
    n_aug: int,
    vocab_size: int,
    num_classes: int,
    *,
    split: str = "train",
    overwrite: bool = False,
    examples_per_shard: Optional[int] = None,
  ):
    self.grid = check_grid(grid)
    self.n_aug = rules.positive_int(n_aug, "n_aug")
    self.vocab_size = rules.positive_int(vocab_size, "vocab_size")
    self.num_classes = rules.positive_int(num_classes, "num_classes")
    example_bytes = self.n_aug * self.grid[0] * self.grid[1] * code_dtype(vocab_size).itemsize
    super().__init__(
      out_dir,
      {
        "grid": list(self.grid),
        "n_aug": self.n_aug,
        "vocab_size": self.vocab_size,
        "num_classes": self.num_classes,
      },
      _features(self.grid, self.n_aug, self.vocab_size),
      f"VQ codes ({vocab_size}-entry codebook) of {num_classes}-class images, "
      "npp_jax.data.code_dataset.",
      split=split,
      overwrite=overwrite,
      examples_per_shard=shard_size(example_bytes, examples_per_shard),
    )
    self.max_code, self.max_label = -1, -1

  def add(self, codes, labels) -> None:
    """Appends codes [B, n_aug, h, w] (or [B, h, w] when n_aug = 1) and labels [B], checked."""
    self._check_open()
    codes, labels = as_examples(
      codes,
      labels,
      vocab_size=self.vocab_size,
      num_classes=self.num_classes,
      where=lambda i: f"at example {self.num_examples + i}",
    )
    codes = check_codes_shape(codes, self.n_aug, self.grid).astype(code_dtype(self.vocab_size))
    self._add_examples([{"codes": c, "label": np.int32(l)} for c, l in zip(codes, labels)])
    self.max_code = max(self.max_code, int(codes.max()))
    self.max_label = max(self.max_label, int(labels.max()))

  def _split_stats(self) -> dict[str, Any]:
    return {"max_code": self.max_code, "max_label": self.max_label}

  def finalize(self) -> CodeDatasetMetadata:
    super().finalize()
    return load_metadata(self.out_dir, self.split)


def check_codes_shape(codes: np.ndarray, n_aug: int, grid) -> np.ndarray:
  if codes.shape[1:] != (n_aug, *grid):
    raise ValueError(
      f"codes batch is [B, n_aug, h, w] = {codes.shape}, the writer expects "
      f"[B, {n_aug}, {grid[0]}, {grid[1]}]"
    )
  return codes


def write_code_dataset(
  out_dir: str,
  codes,
  labels,
  *,
  vocab_size: int,
  num_classes: int,
  split: str = "train",
  overwrite: bool = False,
) -> CodeDatasetMetadata:
  """Writes codes [N, n_aug, h, w] (or [N, h, w]) and labels [N] as `split` of the data set at
  out_dir."""
  vocab_size = rules.positive_int(vocab_size, "vocab_size")
  num_classes = rules.positive_int(num_classes, "num_classes")
  codes, labels = as_examples(codes, labels, vocab_size=vocab_size, num_classes=num_classes)
  with CodeDatasetWriter(
    out_dir,
    codes.shape[2:],
    codes.shape[1],
    vocab_size,
    num_classes,
    split=split,
    overwrite=overwrite,
  ) as writer:
    chunk = max(1, (16 << 20) // codes[0].nbytes)  # Bounds the memory of the serialised examples.
    for i in range(0, len(labels), chunk):
      writer.add(codes[i : i + chunk], labels[i : i + chunk])
  return load_metadata(out_dir, split)


def _tfds_split_names(path) -> list[str]:
  try:
    info = json.loads((epath.Path(path) / "dataset_info.json").read_text())
    return [s["name"] for s in info.get("splits", [])]
  except FileNotFoundError:
    return []


# --------------------------------------------------------------------------------------------------
# Reading.


def split_meta(path: str, split: str, kind: str = "class") -> tuple[dict, dict]:
  """(code_dataset.json, its record of `split`) of a finished split of a data set of `kind`."""
  path = os.fspath(path)
  if not epath.Path(path).is_dir():
    raise ValueError(f"no code data set at {path}: the directory does not exist")
  meta = _read_meta(path)
  if meta is None:
    raise ValueError(f"{path} is not a code data set: {_META_FILE} is missing")
  if meta.get("format") != _FORMAT:
    raise ValueError(
      f"code data set {path} has format {meta.get('format')}, this code reads {_FORMAT}"
    )
  if meta.get("kind", "class") != kind:
    raise ValueError(
      f"{path} is a {meta.get('kind', 'class')} code data set; expected a {kind} code data set"
    )
  s = meta["splits"].get(split)
  if s is None:
    raise ValueError(
      f"code data set {path} has no finished split '{split}' (has: {sorted(meta['splits'])})"
    )
  if s["num_examples"] <= 0:
    raise ValueError(f"split '{split}' of code data set {path} has 0 examples")
  return meta, s


def load_metadata(path: str, split: str = "train") -> CodeDatasetMetadata:
  meta, s = split_meta(path, split)
  return CodeDatasetMetadata(
    num_examples=s["num_examples"],
    grid=tuple(meta["grid"]),
    n_aug=meta["n_aug"],
    vocab_size=meta["vocab_size"],
    num_classes=meta["num_classes"],
    max_code=s["max_code"],
    max_label=s["max_label"],
  )


def finished_splits(path: str) -> list[str]:
  """Names of the splits of the code data set at `path` that are complete (readable); [] if none."""
  meta = _read_meta(os.fspath(path))
  return sorted(meta["splits"]) if meta else []


def open_split(path: str, split: str, load=load_metadata):
  """(load(path, split), the split's TFDS random-access source), their sizes checked to agree."""
  meta = load(path, split)
  source = tfds.builder_from_directory(path).as_data_source(split)
  if len(source) != meta.num_examples:
    raise ValueError(
      f"split '{split}' of {path} holds {len(source)} records, {_META_FILE} says "
      f"{meta.num_examples}"
    )
  return meta, source


class _ClassRows:
  """Examples `ids`, augmentation `aug` each -> {"codes" int32 [B, h, w], "labels" int32 [B]}."""

  def __init__(self, source):
    self.source = source

  def __call__(self, ids: np.ndarray, aug: np.ndarray) -> dict[str, np.ndarray]:
    records = self.source.__getitems__([int(i) for i in ids])  # One batched read.
    codes = np.stack([r["codes"] for r in records])
    return {
      "codes": codes[np.arange(len(ids)), aug].astype(np.int32),
      "labels": np.array([r["label"] for r in records], np.int32),
    }


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a bijective scramble of uint64 (wrapping arithmetic is the point)."""
  x = x ^ (x >> np.uint64(30))
  x = x * np.uint64(0xBF58476D1CE4E5B9)
  x = x ^ (x >> np.uint64(27))
  x = x * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def augmentation_index(seed: int, epoch: int, example_ids, n_aug: int) -> np.ndarray:
  """Which augmentation each example gets in an epoch: a hash of (seed, epoch, example), so the
  choice does not depend on batch size, process count or position in the batch."""
  ids = np.asarray(example_ids, dtype=np.uint64)
  key = _mix64(np.array([seed & (2**64 - 1)], np.uint64)) ^ np.uint64(epoch)
  return (_mix64(_mix64(key) ^ ids) % np.uint64(n_aug)).astype(np.int64)


class _TrainBatch:
  """Global batch of example ids at step s -> this process's slice, read, one augmentation each."""

  def __init__(
    self, rows, seed: int, n_aug: int, steps_per_epoch: int, process_index: int, local: int
  ):
    self.rows, self.seed, self.n_aug = rows, seed, n_aug
    self.steps_per_epoch, self.process_index, self.local = steps_per_epoch, process_index, local

  def __call__(self, step: int, ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = ids[self.process_index * self.local : (self.process_index + 1) * self.local]
    aug = augmentation_index(self.seed, step // self.steps_per_epoch, ids, self.n_aug)
    return self.rows(ids, aug)


def _local_batch(batch_size: int, process_index: int, process_count: int, what: str) -> int:
  rules.positive_int(batch_size, what)
  rules.positive_int(process_count, "process_count")
  if batch_size % process_count:
    raise ValueError(f"{what} {batch_size} is not divisible by process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  return batch_size // process_count


def _to_iterator(
  ds: grain.MapDataset, worker_count: int, read_threads: int
) -> grain.DatasetIterator:
  # Elements are whole batches, so a few threads (or worker processes) keep a few batches ahead.
  it_ds = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=2 * read_threads)
  )
  if worker_count > 0:
    # grain 0.2's worker start reads its absl flags and fails unless they were parsed: mark them
    # parsed (defaults) when no absl.app did it, as in tests and notebooks. Parsing argv later still
    # works.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it_ds)


def make_train_iterator(
  path: str,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
  split: str = "train",
  worker_count: int = 0,
  read_threads: int = 4,
) -> grain.DatasetIterator:
  """Infinite iterator of {"codes": int32 [local, h, w], "labels": int32 [local]}, local = global /
  processes.

  Step s draws the global batch s of a seeded order: epoch e = s // steps_per_epoch is a fresh
  shuffle of all examples with its remainder dropped, and every example gets
  augmentation_index(seed, e, id). The order depends only on (seed, global_batch_size, data), never
  on process_count or worker_count; process p gets rows [p * local, (p + 1) * local) of every global
  batch.
  """
  meta, source = open_split(path, split)
  return train_iterator(
    f"split '{split}' of {path}",
    meta.num_examples,
    meta.n_aug,
    _ClassRows(source),
    global_batch_size=global_batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    worker_count=worker_count,
    read_threads=read_threads,
  )


def train_iterator(
  what: str,
  num_examples: int,
  n_aug: int,
  rows,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int,
  process_count: int,
  worker_count: int,
  read_threads: int,
) -> grain.DatasetIterator:
  """make_train_iterator's order for any kind of data set: `rows(ids, aug) -> batch dict` reads the
  examples (a picklable object when worker_count > 0)."""
  local = _local_batch(global_batch_size, process_index, process_count, "global_batch_size")
  steps = steps_per_epoch(num_examples, global_batch_size)
  if steps == 0:
    raise ValueError(
      f"global_batch_size {global_batch_size} is larger than {what} "
      f"({num_examples} examples); expected at most one epoch per batch"
    )
  # grain's shuffle reseeds with seed + epoch; scrambling the seed first keeps runs with
  # neighbouring seeds from sharing epochs. Slicing after the shuffle and repeating after the slice
  # passes the epoch on (grain maps index i of epoch e to parent index i + e * len), so each epoch
  # is a new permutation cut to full batches.
  shuffle_seed = int(_mix64(np.array([seed & (2**64 - 1)], np.uint64))[0] % np.uint64(2**32))
  order = grain.MapDataset.range(num_examples).shuffle(seed=shuffle_seed)[
    : steps * global_batch_size
  ]
  batches = order.repeat().batch(global_batch_size, drop_remainder=True)
  ds = batches.map_with_index(_TrainBatch(rows, seed, n_aug, steps, process_index, local))
  return _to_iterator(ds, worker_count, read_threads)


class _EvalBatch:
  """Batch b -> this process's rows of examples [b * batch, (b + 1) * batch), augmentation 0,
  padded."""

  def __init__(self, rows, num_examples: int, batch_size: int, process_index: int, local: int):
    self.rows, self.num_examples = rows, num_examples
    self.batch_size, self.process_index, self.local = batch_size, process_index, local

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    ids = b * self.batch_size + self.process_index * self.local + np.arange(self.local)
    mask = ids < self.num_examples
    # Padding rows read example 0 and are zeroed: every kind of data set pads the same way.
    batch = self.rows(np.where(mask, ids, 0), np.zeros_like(ids))
    pad = lambda x: np.where(mask.reshape(-1, *[1] * (x.ndim - 1)), x, np.zeros_like(x))
    return {**{k: pad(x) for k, x in batch.items()}, "mask": mask}


def make_eval_iterator(
  path: str,
  *,
  batch_size: int,
  split: str,
  process_index: int = 0,
  process_count: int = 1,
  read_threads: int = 4,
) -> grain.DatasetIterator:
  """One ordered pass over a split: {"codes" [local, h, w], "labels" [local], "mask" bool [local]}.

  Augmentation 0 (LlamaGen's first crop, unflipped). The last batch is padded with zeros and mask
  False; every process gets the same number of batches, so collective steps stay in lockstep.
  """
  meta, source = open_split(path, split)
  return eval_iterator(
    meta.num_examples, _ClassRows(source), batch_size, process_index, process_count, read_threads
  )


def eval_iterator(
  num_examples: int,
  rows,
  batch_size: int,
  process_index: int,
  process_count: int,
  read_threads: int,
) -> grain.DatasetIterator:
  """make_eval_iterator's pass for any kind of data set (`rows` as in train_iterator)."""
  local = _local_batch(batch_size, process_index, process_count, "batch_size")
  num_batches = -(-num_examples // batch_size)
  ds = grain.MapDataset.range(num_batches).map(
    _EvalBatch(rows, num_examples, batch_size, process_index, local)
  )
  return _to_iterator(ds, 0, read_threads)


def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
  """The iterator's position as JSON-ready data (for orbax `args.JsonSave`).

  With worker_count=0 it is {"next_index": batches consumed}: the step, since the order is indexed
  by step. With worker processes it is grain's per-worker record, which only an iterator with as
  many workers reads.
  """
  state = it.get_state()
  # Fail here, not at checkpoint or restore time, if grain puts in something JSON changes (int dict
  # keys).
  if json.loads(json.dumps(state)) != state:
    raise ValueError(f"grain iterator state {state} does not survive JSON")
  return state


def restore_iterator(it: grain.DatasetIterator, state: dict[str, Any]) -> grain.DatasetIterator:
  """Moves `it` (fresh or used, built with the same arguments) to `state`; returns it for
  chaining."""
  # Worker iterators apply a state lazily, in the workers: check its shape here for a readable
  # error.
  if set(state) != set(it.get_state()):
    raise ValueError(
      f"iterator state with keys {sorted(state)} does not fit this iterator (keys "
      f"{sorted(it.get_state())}); was it saved with another worker_count?"
    )
  it.set_state(state)
  return it
