"""TensorBoard summaries, progress reports and a profile window, without TensorFlow.

clu's metric writers and periodic actions import TensorFlow, whose CPU build has no macOS or Linux
aarch64 wheels and clashes with the `tensorflow` that Colab and TPU VM images preinstall. The
`tensorboard` package writes the same event files on its own: scalars as TF2's `tf.summary.scalar`
writes them (a float tensor with the `scalars` plugin's metadata), so TensorBoard and
tests/support/scalars.read_scalars read them as before.

  writer = summaries.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  hooks = [summaries.ReportProgress(num_train_steps=n, writer=writer)]   # hook(step) after every
  step
"""

import os
import time
from typing import Any, Mapping

from absl import logging
from clu import parameter_overview
import numpy as np

from npp_jax import files


class MetricWriter:
  """clu's MetricWriter interface: every write is logged; with a logdir, also written as TensorBoard
  events."""

  def __init__(self, logdir: str | os.PathLike | None = None):
    self._events = None
    if logdir is not None and "://" in os.fspath(logdir):
      self._events = _ObjectEventWriter(os.fspath(logdir))
    elif logdir is not None:
      self._events = _LocalEventWriter(os.fspath(logdir))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    values = {tag: float(np.asarray(v)) for tag, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{tag}={v:.6g}" for tag, v in values.items()))
    if self._events is not None:
      from tensorboard.plugins.scalar import summary_v2

      for tag, value in values.items():
        self._add(step, summary_v2.scalar_pb(tag, value))

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    logging.info("[Hyperparameters] %s", dict(hparams))
    if self._events is not None:
      from tensorboard.plugins.hparams import summary_v2

      # The hparams plugin takes bool, int, float and str; anything else (tuples, None) as its text.
      values = {
        k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()
      }
      self._add(0, summary_v2.hparams_pb(values))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """{tag: uint8 [N, H, W, C] (C = 1, 3 or 4)}: each image PNG-encoded (PIL), shown by
    TensorBoard's image dashboard (tags "tag/0", "tag/1", ... when N > 1, as clu names them)."""
    logging.info(
      "[%d] images: %s", step, ", ".join(f"{t} {np.shape(v)}" for t, v in images.items())
    )
    if self._events is None:
      return
    import io

    from PIL import Image
    from tensorboard.compat.proto import summary_pb2

    for tag, batch in images.items():
      batch = np.asarray(batch)
      if batch.ndim != 4 or batch.dtype != np.uint8 or batch.shape[-1] not in (1, 3, 4):
        raise ValueError(
          f"write_images: {tag} is {batch.dtype} {batch.shape}; expected uint8 [N, H, W, 1|3|4]"
        )
      for i, img in enumerate(batch):
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="PNG")
        value = summary_pb2.Summary.Image(
          height=img.shape[0],
          width=img.shape[1],
          colorspace=img.shape[-1],
          encoded_image_string=buf.getvalue(),
        )
        name = tag if len(batch) == 1 else f"{tag}/{i}"
        self._add(
          step, summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=name, image=value)])
        )

  def _add(self, step: int, summary) -> None:
    from tensorboard.compat.proto import event_pb2

    self._events.add_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()

  def close(self) -> None:
    if self._events is not None:
      self._events.close()
      self._events = None


def _event_file_name() -> str:
  import socket

  return f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"


class _LocalEventWriter:
  """Event records appended to a local file. tensorboard's EventFileWriter does the same, but opens
  the file through TF's gfile whenever TensorFlow is importable, and importing TensorFlow costs
  about 4 CPU seconds in every process that writes events (the demo, every training run)."""

  def __init__(self, logdir: str):
    # Imported here: the `tensorboard` wheel is only needed by the process that writes event files.
    from etils import epath
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    path = epath.Path(logdir) / _event_file_name()
    path.parent.mkdir(parents=True, exist_ok=True)
    self._file = path.open("wb")
    self._records = RecordWriter(self._file)
    self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def add_event(self, event) -> None:
    # Flushed at once: a record is written every few seconds at most, and TensorBoard sees it live.
    self._records.write(event.SerializeToString())
    self._file.flush()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()


class _ObjectEventWriter:
  """Event records for a gs:// (any epath scheme) logdir. tensorboard's EventFileWriter goes through
  TF's gfile when TensorFlow is importable, and TF's GCS client ignores STORAGE_EMULATOR_HOST and
  gcsfs's credentials; objects cannot be appended to, so, as TF's GCS file does on flush, the whole
  event file is uploaded again (epath, atomically per object) every `flush_secs` and on
  flush()/close()."""

  def __init__(self, logdir: str, flush_secs: float = 120.0):
    import io

    from etils import epath
    from tensorboard.compat.proto import event_pb2
    from tensorboard.summary.writer.record_writer import RecordWriter

    self._path = epath.Path(logdir) / _event_file_name()
    self._path.parent.mkdir(parents=True, exist_ok=True)
    self._buf, self._flush_secs, self._last = io.BytesIO(), flush_secs, time.monotonic()
    self._records = RecordWriter(self._buf)
    self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))
    self.flush()

  def add_event(self, event) -> None:
    self._records.write(event.SerializeToString())
    if time.monotonic() - self._last >= self._flush_secs:
      self.flush()

  def flush(self) -> None:
    self._path.write_bytes(self._buf.getvalue())
    self._last = time.monotonic()

  def close(self) -> None:
    self.flush()


def write_parameter_overview(params, workdir, *, is_main: bool = True) -> int:
  """clu's parameter table (name, shape, dtype, size; no statistics, which would read every sharded
  value to the host) written to WORKDIR/parameters.txt by process 0, and one INFO line naming it: a
  large model's table runs to hundreds of lines, which belong in a file, not the console. clu's
  parameter_overview imports no TensorFlow (its metric writers do: see above). Returns the count."""
  count = int(parameter_overview.count_parameters(params))
  path = files.absolute(workdir) / "parameters.txt"
  if is_main:
    table = parameter_overview.get_parameter_overview(params, include_stats=False)
    files.atomic_write(path, lambda f: f.write((table + "\n").encode()))
  logging.info("%s parameters; their table is in %s.", f"{count:,}", path)
  return count


def create_default_writer(
  logdir: str | os.PathLike | None, *, just_logging: bool = False
) -> MetricWriter:
  """As clu's: TensorBoard events in logdir (process 0), log lines only where just_logging (the
  others)."""
  return MetricWriter(None if just_logging else logdir)


class ReportProgress:
  """hook(step) after every step: at most every `every_secs`, logs steps/s, progress and ETA, and
  writes steps_per_sec (clu's ReportProgress, without its work-unit notes)."""

  def __init__(
    self, *, num_train_steps: int, writer: MetricWriter | None = None, every_secs: float = 60.0
  ):
    self.num_train_steps, self.writer, self.every_secs = num_train_steps, writer, every_secs
    self._last: tuple[int, float] | None = None

  def __call__(self, step: int) -> None:
    now = time.monotonic()
    if (
      self._last is None
    ):  # The first call starts the clock: the step before it includes compilation.
      self._last = (step, now)
      return
    last_step, last_t = self._last
    if now - last_t < self.every_secs or step <= last_step:
      return
    rate = (step - last_step) / (now - last_t)
    eta_min = (self.num_train_steps - step) / rate / 60 if rate > 0 else float("inf")
    logging.info(
      "%.3g steps/s, %.1f%% (%d/%d), ETA: %.0f min",
      rate,
      100 * step / self.num_train_steps,
      step,
      self.num_train_steps,
      eta_min,
    )
    if self.writer is not None:
      self.writer.write_scalars(step, {"steps_per_sec": rate})
    self._last = (step, now)


class Profile:
  """hook(step): a jax.profiler trace of `num_profile_steps` steps from `first_profile` on, into
  logdir (TensorBoard's profile plugin reads it)."""

  def __init__(
    self, *, logdir: str | os.PathLike, num_profile_steps: int = 5, first_profile: int = 10
  ):
    self.logdir, self.first, self.last = (
      os.fspath(logdir),
      first_profile,
      first_profile + num_profile_steps,
    )
    self._on = False

  def __call__(self, step: int) -> None:
    import jax

    if not self._on and self.first <= step < self.last:
      jax.profiler.start_trace(self.logdir)
      self._on = True
    elif self._on and step >= self.last:
      jax.profiler.stop_trace()
      self._on = False
