"""Caption extraction: lines of LlamaGen's image + caption index -> caption code data set examples.

For each batch of index lines, every process reads and crops its share of the images, the VQ encodes
them and the T5 encoder (npp_jax.text_encoder) encodes the captions, both split over the mesh's data
axes; the rows are gathered, put back in index order, and process 0 writes them
(npp_jax.data.captions). An image that cannot be read, or whose short side is under the VQ's image
size (LlamaGen's t2i data set refuses both), becomes an invalid example and is counted; its caption
is kept.

`encode_batch` is one batch: `--mode=extract` with extract.captions (npp_jax.jobs.extract) runs it
per shard, resumably; `extract_captions` runs them all into a writer, in one pass (notebooks,
tests).
"""

import dataclasses
from typing import Callable, Optional, Sequence

from etils import epath
import jax
import numpy as np
from PIL import Image

from npp_jax import sharding
from npp_jax import text_encoder as text_encoder_lib
from npp_jax.data import caption_index
from npp_jax.data import captions
from npp_jax.data import images as images_lib


def load_image(path: str, image_size: int) -> Optional[np.ndarray]:
  """uint8 RGB [H, W, 3], or None when the file cannot be read as an image or its short side is
  under image_size."""
  try:
    image = images_lib.to_rgb(epath.Path(path).read_bytes())
  except (
    OSError,
    ValueError,
    Image.DecompressionBombError,
  ):  # PIL's UnidentifiedImageError: OSError.
    return None
  return image if min(image.shape[:2]) >= image_size else None


@dataclasses.dataclass(frozen=True)
class Views:
  """How images become VQ inputs: images_lib.augment's arguments, and its threads."""

  aug: str = "none"  # LlamaGen's t2i training centre-crops, unflipped.
  image_size: int = 256
  crop_range: float = 1.1
  threads: int = 2

  @property
  def n_aug(self) -> int:
    return images_lib.AUGS[self.aug]


def local_rows(entries: Sequence[caption_index.Entry], device_rows: int, views: Views):
  """This process's lines (ids -1: padding up to device_rows) -> (uint8 views [device_rows, n_aug,
  S, S, 3], captions [device_rows], image read bool [device_rows])."""
  s = views.image_size
  out = np.zeros((device_rows, views.n_aug, s, s, 3), np.uint8)
  texts = [e.caption for e in entries] + [""] * (device_rows - len(entries))
  # In a 1-tuple: grain drops None results, which would shift every later image.
  loaded = images_lib.parallel_map(
    lambda e: (load_image(e.image_path, s),), list(entries), views.threads
  )
  ok = np.zeros((device_rows,), bool)
  for i, (image,) in enumerate(loaded):
    if image is not None:
      out[i] = images_lib.augment(image, views.aug, s, views.crop_range)
      ok[i] = True
  return out, texts, ok


def encode_batch(
  entries: Sequence[caption_index.Entry],
  ids: np.ndarray,
  device_rows: int,
  *,
  encode_views: Callable[[np.ndarray], np.ndarray],
  encoder: text_encoder_lib.TextEncoder,
  views: Views,
) -> dict[str, np.ndarray]:
  """One batch: this process's index lines `entries` with their example ids, padded to device_rows
  rows -> every process's rows, gathered: {"ids" (-1: padding), "codes" [R, n_aug, h, w],
  "caption" [R, max_length, dim] float32, "caption_len", "valid"}, R = processes x device_rows.

  encode_views(uint8 views [device_rows, n_aug, S, S, 3]) -> gathered codes: the extraction job's VQ
  on the mesh (npp_jax.jobs.extract.encode_views). Collective: every process calls it per batch.
  """
  pixels, texts, ok = local_rows(entries, device_rows, views)
  codes = encode_views(pixels)
  caption = encoder(texts)
  padded = np.full((device_rows,), -1, np.int64)
  padded[: len(ids)] = ids
  meta = np.stack([padded, ok.astype(np.int64)], axis=1)
  batch = sharding.data_sharding(encoder.mesh)
  meta = sharding.gather(jax.make_array_from_process_local_data(batch, meta))
  return {
    "ids": meta[:, 0],
    "codes": codes,
    "caption": caption.features,
    "caption_len": caption.lengths,
    "valid": meta[:, 1].astype(bool) & (meta[:, 0] >= 0),
    "truncated": caption.truncated,
  }


def in_order(batch: dict[str, np.ndarray], start: int, count: int) -> dict[str, np.ndarray]:
  """The gathered rows of examples start .. start + count - 1, in order (padding rows dropped)."""
  keep = batch["ids"] >= 0
  order = np.argsort(batch["ids"][keep], kind="stable")
  got = batch["ids"][keep][order]
  if not np.array_equal(got, np.arange(start, start + count)):
    raise RuntimeError(
      f"caption extraction gathered examples {got[:8].tolist()}... for examples "
      f"[{start}, {start + count}): the processes did not share the batch"
    )
  return {k: v[keep][order] for k, v in batch.items() if k != "truncated"}


def process_share(start: int, stop: int, process_index: int, process_count: int) -> range:
  """The consecutive part of examples [start, stop) that one process reads."""
  per = -(-(stop - start) // process_count)
  lo = min(start + process_index * per, stop)
  return range(lo, min(lo + per, stop))


def extract_captions(
  entries: Sequence[caption_index.Entry],
  writer: Optional[captions.CaptionDatasetWriter],
  *,
  batch_size: int,
  encode_views: Callable[[np.ndarray], np.ndarray],
  encoder: text_encoder_lib.TextEncoder,
  views: Views,
) -> dict[str, int]:
  """All index lines, batch by batch, into `writer` (process 0's; None elsewhere). Returns counts:
  examples, skipped (images unreadable or too small), truncated (captions over max_length)."""
  procs = jax.process_count()
  per = sharding.data_parallel_size(encoder.mesh) // procs
  local = -(-batch_size // procs)
  device_rows = -(-local // per) * per
  counts = {"examples": 0, "skipped": 0, "truncated": 0}
  for start in range(0, len(entries), batch_size):
    stop = min(start + batch_size, len(entries))
    mine = process_share(start, stop, jax.process_index(), procs)
    batch = encode_batch(
      [entries[i] for i in mine],
      np.arange(mine.start, mine.stop),
      device_rows,
      encode_views=encode_views,
      encoder=encoder,
      views=views,
    )
    rows = in_order(batch, start, stop - start)
    counts["examples"] += stop - start
    counts["skipped"] += int((~rows["valid"]).sum())
    counts["truncated"] += batch["truncated"]
    if writer is not None:
      texts = [entries[i].caption for i in range(start, stop)]
      writer.add(rows["codes"], rows["caption"], rows["caption_len"], texts, rows["valid"])
  return counts
