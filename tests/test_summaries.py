"""npp_jax.summaries: TensorBoard event files written without TensorFlow, read back by
tensorboard's reader; clu's parameter table and metrics, which need no TensorFlow either."""

import numpy as np
from support.paths import ROOT
from support.scalars import read_scalars
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


def test_parameter_table_and_eval_averages_without_tensorflow(tmp_path):
  """clu's parameter_overview (the table in WORKDIR/parameters.txt) and clu.metrics (the trainer's
  held-out averages, masked rows left out) in a process where TensorFlow cannot be imported; the
  averages against NumPy's over the real rows of three batches."""
  import json
  import subprocess
  import sys

  from support.images import NO_TENSORFLOW

  rng = np.random.default_rng(0)
  batches = [
    (rng.uniform(1, 6, 8), rng.normal(0, 2, 8), rng.uniform(size=8) < 0.7) for _ in range(3)
  ]
  batches[2][2][:] = False  # An all-padding batch changes nothing.
  batches[0][2][0] = True
  code = NO_TENSORFLOW + (
    "import json\n"
    "import numpy as np\n"
    "from npp_jax import summaries\n"
    "from npp_jax.evaluators import heldout_nll\n"
    "params = {'block': {'kernel': np.ones((3, 4), np.float32)}, 'scale': np.ones(5, np.float32)}\n"
    f"count = summaries.write_parameter_overview(params, {str(tmp_path)!r})\n"
    "total = heldout_nll.EvalMetrics.empty()\n"
    f"for nll, info, mask in {[[b.tolist() for b in batch] for batch in batches]!r}:\n"
    "  total = total.merge(heldout_nll.EvalMetrics.single_from_model_output(\n"
    "    nll=np.array(nll, np.float32), class_info=np.array(info, np.float32),\n"
    "    mask=np.array(mask)))\n"
    "out = total.compute()\n"
    "print(json.dumps({'count': count, 'nll': float(out['nll']),\n"
    "  'class_info': float(out['class_info']), 'tf': 'tensorflow' in sys.modules}))\n"
  )
  run = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert run.returncode == 0, run.stderr[-3000:]
  got = json.loads(run.stdout.strip().splitlines()[-1])
  assert got["count"] == 17 and not got["tf"]
  table = (tmp_path / "parameters.txt").read_text()
  assert "block/kernel" in table and "(3, 4)" in table and "Total: 17" in table
  mask = np.concatenate([m for _, _, m in batches])
  nll = np.concatenate([n for n, _, _ in batches])
  info = np.concatenate([i for _, i, _ in batches])
  np.testing.assert_allclose(got["nll"], nll[mask].mean(), rtol=1e-6)
  np.testing.assert_allclose(got["class_info"], info[mask].mean(), rtol=1e-5, atol=1e-6)


def test_local_event_files_import_no_tensorflow(tmp_path):
  """A local logdir's events are written without importing TensorFlow even where it is installed
  (tensorboard's EventFileWriter imports it: ~4 CPU s a process); TensorBoard reads them."""
  import subprocess
  import sys

  code = (
    "import sys\n"
    "import numpy as np\n"
    "from npp_jax import summaries\n"
    f"w = summaries.create_default_writer({str(tmp_path)!r})\n"
    "w.write_hparams({'optim.lr': 1e-4})\n"
    "w.write_scalars(3, {'loss': 2.5})\n"
    "w.write_images(3, {'grid': np.zeros((1, 4, 4, 3), np.uint8)})\n"
    "w.close()\n"
    "print('tensorflow' in sys.modules)\n"
  )
  run = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert run.returncode == 0, run.stderr[-3000:]
  assert run.stdout.strip().splitlines()[-1] == "False"
  assert read_scalars(str(tmp_path))["loss"] == [(3, 2.5)]
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert "_hparams_/session_start_info" in acc.summary_metadata
  assert acc.Tags()["images"] == ["grid"]
