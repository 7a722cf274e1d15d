"""npp_jax.summaries: TensorBoard event files written without TensorFlow, read back by tensorboard's reader."""

from helpers import read_scalars  # noqa: E402  (tests/ is on sys.path)
from tensorboard.backend.event_processing import event_accumulator

from npp_jax import summaries


def test_scalars_hparams_and_progress_round_trip(tmp_path):
  writer = summaries.create_default_writer(tmp_path)
  writer.write_hparams({"optim.lr": 1e-4, "mesh.shape": (-1, 1, 1), "model.name": "GPT-B"})
  writer.write_scalars(1, {"loss": 5.5, "k": 4})
  writer.write_scalars(2, {"loss": 4.25})
  progress = summaries.ReportProgress(num_train_steps=10, writer=writer, every_secs=0.0)
  progress(2)  # Starts the clock.
  progress(5)
  writer.flush()
  scalars = read_scalars(str(tmp_path))
  assert scalars["loss"] == [(1, 5.5), (2, 4.25)] and scalars["k"] == [(1, 4.0)]
  assert [s for s, _ in scalars["steps_per_sec"]] == [5] and scalars["steps_per_sec"][0][1] > 0
  # TensorBoard's own loader sees the hparams session too.
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert "_hparams_/session_start_info" in acc.summary_metadata


def test_just_logging_writes_no_files(tmp_path):
  writer = summaries.create_default_writer(tmp_path / "other", just_logging=True)
  writer.write_scalars(1, {"loss": 1.0})
  writer.flush()
  assert not (tmp_path / "other").exists()
