"""The caption code data set: VQ code grids of images with their caption features (text to image).

The class data set's format (npp_jax.data.code_dataset: TFDS array_record + code_dataset.json,
written split by split, read with grain in the same seeded, process-independent order, with the same
iterator state) with other examples. code_dataset.json says "kind": "caption" and records grid,
n_aug, vocab_size, caption_dim and max_length; per split num_examples, num_valid, max_code and the
longest caption. One record per image:

  codes    [n_aug, h, w] uint16 (int32 past 65536 codes)
  caption  [L, caption_dim] bfloat16: the T5 encoder's last hidden state of the caption's L tokens
           (EOS included, L <= max_length), as LlamaGen's extractor keeps them
  text     the caption (UTF-8), for looking and for evaluation prompts
  valid    False for an image that could not be read or a caption without features: kept so that
           example i stays line i of the index, and left out of the loss as LlamaGen leaves it out

Batches: {"codes" int32 [B, h, w], "caption" bfloat16 [B, max_length, caption_dim], "caption_len"
int32 [B], "valid" bool [B]}; the caption is RIGHT-aligned (zeros first, LlamaGen's left padding),
and eval batches add "mask". Only L rows are stored: at ~20 tokens a caption that is 1/6 of the
padded size.
"""

import dataclasses
from typing import Any, Optional, Sequence

import ml_dtypes
import numpy as np
import tensorflow_datasets as tfds

from npp_jax import text
from npp_jax import validate
from npp_jax.data import code_dataset

KIND = "caption"


@dataclasses.dataclass(frozen=True)
class CaptionDatasetMetadata:
  num_examples: int
  num_valid: int
  grid: tuple[int, int]
  n_aug: int
  vocab_size: int
  caption_dim: int
  max_length: int
  max_code: int
  max_caption_length: int


def _features(grid, n_aug: int, vocab_size: int, caption_dim: int) -> tfds.features.FeaturesDict:
  bytes_ = tfds.features.Encoding.BYTES  # A frombuffer at read time, as the class data set's codes.
  return tfds.features.FeaturesDict(
    {
      "codes": tfds.features.Tensor(
        shape=(n_aug, *grid), dtype=code_dataset.code_dtype(vocab_size), encoding=bytes_
      ),
      "caption": tfds.features.Tensor(
        shape=(None, caption_dim), dtype=ml_dtypes.bfloat16, encoding=bytes_
      ),
      "text": tfds.features.Text(),
      "valid": tfds.features.Tensor(shape=(), dtype=np.bool_),
    }
  )


class CaptionDatasetWriter(code_dataset.SplitWriter):
  """Writes one split of a caption code data set batch by batch (code_dataset.SplitWriter's
  rules)."""

  KIND = KIND
  TFDS_NAME = "npp_captions"

  def __init__(
    self,
    out_dir: str,
    grid: Sequence[int],
    n_aug: int,
    vocab_size: int,
    caption_dim: int,
    *,
    max_length: int = text.MAX_LENGTH,
    split: str = "train",
    overwrite: bool = False,
    examples_per_shard: Optional[int] = None,
  ):
    self.grid = code_dataset.check_grid(grid)
    self.n_aug = validate.positive_int(n_aug, "n_aug")
    self.vocab_size = validate.positive_int(vocab_size, "vocab_size")
    self.caption_dim = validate.positive_int(caption_dim, "caption_dim")
    self.max_length = validate.positive_int(max_length, "max_length")
    code_bytes = self.n_aug * self.grid[0] * self.grid[1] * 2
    super().__init__(
      out_dir,
      {
        "grid": list(self.grid),
        "n_aug": self.n_aug,
        "vocab_size": self.vocab_size,
        "caption_dim": self.caption_dim,
        "max_length": self.max_length,
      },
      _features(self.grid, self.n_aug, self.vocab_size, self.caption_dim),
      f"VQ codes ({vocab_size}-entry codebook) of images with {caption_dim}-wide caption "
      "features, npp_jax.data.captions.",
      split=split,
      overwrite=overwrite,
      # Sized for a typical caption of 32 tokens.
      examples_per_shard=code_dataset.shard_size(
        code_bytes + 32 * self.caption_dim * 2, examples_per_shard
      ),
    )
    self.num_valid, self.max_code, self.max_caption_length = 0, -1, 0

  def add(self, codes, captions, lengths, texts: Sequence[str], valid) -> None:
    """Appends a batch of B images: codes [B, n_aug, h, w] (or [B, h, w]), caption features
    [B, T, caption_dim] whose first lengths[i] rows are caption i's (T <= max_length), the caption
    texts, valid [B]. Invalid examples keep their text; their codes and features are not stored."""
    self._check_open()
    codes, captions, lengths, valid = self._checked(codes, captions, lengths, texts, valid)
    dtype = code_dataset.code_dtype(self.vocab_size)
    examples = []
    for c, x, n, t, v in zip(codes, captions, lengths, texts, valid):
      examples.append(
        {
          "codes": (c if v else np.zeros_like(c)).astype(dtype),
          "caption": x[: n if v else 0].astype(ml_dtypes.bfloat16),
          "text": t,
          "valid": bool(v),
        }
      )
    self._add_examples(examples)
    if valid.any():
      self.num_valid += int(valid.sum())
      self.max_code = max(self.max_code, int(codes[valid].max()))
      self.max_caption_length = max(self.max_caption_length, int(lengths[valid].max()))

  def _checked(self, codes, captions, lengths, texts, valid):
    where = lambda i: f"at example {self.num_examples + i}"
    codes, captions = np.asarray(codes), np.asarray(captions)
    lengths, valid = np.asarray(lengths), np.asarray(valid)
    if codes.ndim == 3:
      codes = codes[:, None]
    b = len(codes)
    codes = code_dataset.check_codes_shape(codes, self.n_aug, self.grid)
    if captions.ndim != 3 or captions.shape[0] != b or captions.shape[2] != self.caption_dim:
      raise ValueError(
        f"caption features have shape {captions.shape}; expected [{b}, T, {self.caption_dim}] "
        f"(caption_dim {self.caption_dim})"
      )
    if captions.shape[1] > self.max_length:
      raise ValueError(
        f"caption features have {captions.shape[1]} positions; expected at most max_length "
        f"{self.max_length}"
      )
    if lengths.shape != (b,) or valid.shape != (b,) or len(texts) != b:
      raise ValueError(
        f"lengths {lengths.shape}, valid {valid.shape} and {len(texts)} texts; expected one each "
        f"of the {b} examples"
      )
    if not np.issubdtype(lengths.dtype, np.integer) or valid.dtype != np.bool_:
      raise ValueError(
        f"lengths must be integers and valid bool, got {lengths.dtype}, {valid.dtype}"
      )
    bad = valid & ((lengths < 1) | (lengths > captions.shape[1]))
    if bad.any():
      i = int(np.argmax(bad))
      raise ValueError(
        f"caption length {lengths[i]} {where(i)} is outside [1, {captions.shape[1]}]"
      )
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise ValueError(f"caption text {where(i)} is a {type(t).__name__}; expected a str")
    if valid.any():
      if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {codes.dtype}")
      out = valid[:, None, None, None] & ((codes < 0) | (codes >= self.vocab_size))
      if out.any():
        i = int(np.argmax(out.any(axis=(1, 2, 3))))
        value = int(codes[i][out[i]][0])
        raise ValueError(f"code {value} {where(i)} is outside [0, vocab_size {self.vocab_size})")
      finite = np.isfinite(captions.astype(np.float32)).all(axis=(1, 2))
      if not (finite | ~valid).all():
        raise ValueError(
          f"caption features {where(int(np.argmin(finite | ~valid)))} are not finite"
        )
    return codes.astype(np.int64), captions, lengths.astype(np.int64), valid

  def _split_stats(self) -> dict[str, Any]:
    return {
      "num_valid": self.num_valid,
      "max_code": self.max_code,
      "max_caption_length": self.max_caption_length,
    }

  def finalize(self) -> CaptionDatasetMetadata:
    super().finalize()
    return load_metadata(self.out_dir, self.split)


# --------------------------------------------------------------------------------------------------
# Reading.


def load_metadata(path: str, split: str = "train") -> CaptionDatasetMetadata:
  meta, s = code_dataset.split_meta(path, split, KIND)
  return CaptionDatasetMetadata(
    num_examples=s["num_examples"],
    num_valid=s["num_valid"],
    grid=tuple(meta["grid"]),
    n_aug=meta["n_aug"],
    vocab_size=meta["vocab_size"],
    caption_dim=meta["caption_dim"],
    max_length=meta["max_length"],
    max_code=s["max_code"],
    max_caption_length=s["max_caption_length"],
  )


class _CaptionRows:
  """Examples `ids` with augmentation `aug` each -> a caption batch (module docstring)."""

  def __init__(self, source, meta: CaptionDatasetMetadata):
    self.source, self.max_length, self.dim = source, meta.max_length, meta.caption_dim

  def __call__(self, ids: np.ndarray, aug: np.ndarray) -> dict[str, np.ndarray]:
    records = self.source.__getitems__([int(i) for i in ids])  # One batched read.
    caption = np.zeros((len(ids), self.max_length, self.dim), ml_dtypes.bfloat16)
    lengths = np.zeros((len(ids),), np.int32)
    for i, r in enumerate(records):
      n = lengths[i] = len(r["caption"])
      if n:
        caption[i, self.max_length - n :] = r["caption"]  # Right-aligned: LlamaGen's left padding.
    codes = np.stack([r["codes"] for r in records])
    return {
      "codes": codes[np.arange(len(ids)), aug].astype(np.int32),
      "caption": caption,
      "caption_len": lengths,
      "valid": np.array([r["valid"] for r in records], np.bool_),
    }


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
):
  """As code_dataset.make_train_iterator (same order, same state), with caption batches."""
  meta, source = code_dataset.open_split(path, split, load_metadata)
  return code_dataset.train_iterator(
    f"split '{split}' of {path}",
    meta.num_examples,
    meta.n_aug,
    _CaptionRows(source, meta),
    global_batch_size=global_batch_size,
    seed=seed,
    process_index=process_index,
    process_count=process_count,
    worker_count=worker_count,
    read_threads=read_threads,
  )


def make_eval_iterator(
  path: str,
  *,
  batch_size: int,
  split: str,
  process_index: int = 0,
  process_count: int = 1,
  read_threads: int = 4,
):
  """One ordered pass (augmentation 0), padded with zeros and "mask" False as the class one."""
  meta, source = code_dataset.open_split(path, split, load_metadata)
  rows = _CaptionRows(source, meta)
  return code_dataset.eval_iterator(
    meta.num_examples, rows, batch_size, process_index, process_count, read_threads
  )


def read_texts(path: str, ids: Sequence[int], split: str = "train") -> list[str]:
  """The caption texts of examples `ids` (evaluation prompts, sample grids)."""
  _, source = code_dataset.open_split(path, split, load_metadata)
  return [r["text"].decode("utf-8") for r in source.__getitems__([int(i) for i in ids])]
