"""The one resumable sharded job (sampling, extraction, Inception features): a job's output cut
into shards of one global batch each, one file per shard in a folder that also records the job's
settings, so that a killed run redoes only the missing shards and never mixes in other settings'.

On several processes every shard is a collective (each process computes its devices' part of every
batch), so every process must run the same shards in the same order, even where the processes see
different disks: process 0's view of the folder decides, and is broadcast. Process 0 alone writes
(the settings, the shards); the final sync keeps every process from returning before it has written.
"""

import dataclasses
import functools
import io
from typing import Iterable

from absl import logging
from etils import epath
import jax
import numpy as np

from npp_jax import files


def _main() -> bool:
  return jax.process_index() == 0


@dataclasses.dataclass(frozen=True)
class Shards:
  """`total` items (samples, images) in shards of `batch_size` (one global batch) under `folder`."""

  folder: epath.Path
  total: int
  batch_size: int
  settings_file: str = "meta.json"
  # Shard files named by index, shard_000003.npz (extraction's), not by span, shard_0300-0400.npz.
  by_index: bool = False

  def __post_init__(self):
    object.__setattr__(self, "folder", epath.Path(self.folder))

  @functools.cached_property
  def spans(self) -> list[tuple[int, int]]:
    """[start, end) of the items in each shard."""
    n, bs = self.total, self.batch_size
    return [(a, min(a + bs, n)) for a in range(0, n, bs)]

  def path(self, i: int) -> epath.Path:
    if self.by_index:
      return self.folder / f"shard_{i:0{max(6, len(str(len(self.spans))))}d}.npz"
    (a, b), width = self.spans[i], len(str(self.total))
    return self.folder / f"shard_{a:0{width}d}-{b:0{width}d}.npz"

  def size(self, shards: Iterable[int]) -> int:
    """Items in those shards."""
    return sum(self.spans[i][1] - self.spans[i][0] for i in shards)

  def check_settings(self, settings: dict, holds: str, expected: str) -> None:
    """One-line ValueError when the folder holds shards of other settings (see
    files.check_same_settings)."""
    files.check_same_settings(
      self.folder / self.settings_file, settings, self.folder, holds, expected
    )

  def start(self, settings: dict, resuming: str = "") -> list[int]:
    """The shards to run: those missing in process 0's folder, the same list on every process.
    Process 0 records the settings. `resuming`: a log line (%d done, %d total, %s folder), logged
    when some shards are done already."""
    if _main():
      self.folder.mkdir(parents=True, exist_ok=True)
      files.write_json(self.folder / self.settings_file, settings)
    missing = np.array([not self.path(i).exists() for i in range(len(self.spans))], bool)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
    todo = [int(i) for i in np.flatnonzero(missing)]
    done = self.total - self.size(todo)
    if resuming and done:
      logging.info(resuming, done, self.total, self.folder)
    return todo

  def write(
    self, todo: list[int], results: Iterable[dict], desc: str, keep: bool = False
  ) -> dict[int, dict]:
    """Runs the shards of `todo` as `results` yields their arrays (every process pulls the same
    results, each one a collective); process 0 writes each shard atomically, under a progress bar.
    Returns the arrays by shard when `keep`, else {}."""
    from tqdm import tqdm

    kept = {}
    initial = self.total - self.size(todo)
    bar = tqdm(
      total=self.total, initial=initial, unit="img", desc=desc, disable=not _main(), smoothing=0.3
    )
    try:
      for i, arrays in zip(todo, results):
        if _main():
          files.atomic_write(self.path(i), functools.partial(_savez, arrays=arrays))
        if keep:
          kept[i] = arrays
        bar.update(self.size([i]))
    finally:
      bar.close()
    return kept

  def finish(self, name: str) -> None:
    """Every process waits here for process 0's writes (`name`: the sync point's name)."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices(name)

  def read(self, i: int) -> dict[str, np.ndarray]:
    """Shard i's arrays from this process's folder."""
    with self.path(i).open("rb") as f, np.load(f) as z:
      return {k: z[k] for k in z.files}

  def read_all(self, fresh: dict[int, dict]) -> list[dict[str, np.ndarray]]:
    """Every shard's arrays, on every process, after `finish`: those computed in this run (`fresh`,
    from `write(keep=True)`) as they are; the others from this process's folder where every process
    has the file, else from process 0's, broadcast (its files decided what ran, and another process
    may see another disk, one that lacks them)."""
    old = [i for i in range(len(self.spans)) if i not in fresh]
    everywhere = np.array([self.path(i).exists() for i in old], bool)
    several = jax.process_count() > 1
    if several and old:
      from jax.experimental import multihost_utils

      everywhere = np.asarray(multihost_utils.process_allgather(everywhere)).all(axis=0)
    out = dict(fresh)
    for i, local in zip(old, everywhere):
      out[i] = self.read(i) if local or not several else self._from_process_0(i)
    return [out[i] for i in range(len(self.spans))]

  def _from_process_0(self, i: int) -> dict[str, np.ndarray]:
    """Shard i's file as process 0 reads it, sent to every process (a collective)."""
    from jax.experimental import multihost_utils

    data = self.path(i).read_bytes() if _main() else b""
    size = int(multihost_utils.broadcast_one_to_all(np.array(len(data), np.int32)))
    buf = np.frombuffer(data, np.uint8) if _main() else np.zeros(size, np.uint8)
    buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    with np.load(io.BytesIO(buf.tobytes())) as z:
      return {k: z[k] for k in z.files}


def _savez(f, arrays: dict) -> None:
  np.savez(f, **arrays)
