"""Real processes: --mode=evaluate resumed by 2 processes x 4 fake CPU devices (loopback, the CLI's
flags) where each process has its own disk (its own --workdir, standing for the same path on two
hosts) and the two copies of the feature cache disagree about which shards exist. Process 0's view
decides which batches run (each is a collective), process 1 gets the shards its copy lacks from
process 0, and both score exactly what one process with 8 devices scored."""

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from support import weights
from support.cli import free_port
from support.cli import multiprocess_env
from support.cli import run_main
from support.cli import start_main

from npp_jax import checkpoints

METRICS = ("fid", "sfid", "inception_score", "precision", "recall", "num_samples")


def _cmd(inputs: dict, workdir) -> list[str]:
  return [
    "--mode=evaluate",
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    "--config.evaluate.resize_to=75",
    "--config.evaluate.batch_size=8",
    "--config.evaluate.fid_method=eigh",
    *[f"--config.evaluate.{k}={v}" for k, v in inputs.items()],
  ]


def _logged_metrics(log: str) -> dict:
  line = [x for x in log.splitlines() if "Metrics: " in x][-1]
  return json.loads(line.split("Metrics: ", 1)[1])


def _shards(workdir, which: str) -> list:
  (folder,) = (workdir / "evaluate").glob(f"{which}-*")
  return sorted(folder.glob("shard_*.npz"))


@pytest.mark.timeout(500)
def test_two_processes_resume_from_disks_that_disagree_and_score_as_one(tmp_path):
  from npp_jax.data import digits
  from npp_jax.data import images

  # 20 samples against 24 reference images, in batches of 8: 3 shards each, the last one short.
  train, test = digits.load_digits("train")[0], digits.load_digits("test")[0]
  np.savez(tmp_path / "samples.npz", arr_0=images.float_to_uint8(train[:20]))
  np.savez(tmp_path / "reference.npz", arr_0=images.float_to_uint8(test[:24]))
  checkpoints.save_params(str(tmp_path / "inception"), weights.random_inception_params(3))
  inputs = {
    "samples": tmp_path / "samples.npz",
    "reference": tmp_path / "reference.npz",
    "inception": tmp_path / "inception",
  }
  w0, w1 = tmp_path / "host0", tmp_path / "host1"
  one = run_main(*_cmd(inputs, w0), env=multiprocess_env(1), timeout=300)
  assert one.returncode == 0, one.stderr[-3000:]
  want = json.loads((w0 / "metrics.json").read_text())
  with np.load(w0 / "sample_stats.npz") as z:
    want_pool3 = z["pool3"]
  assert len(_shards(w0, "samples")) == len(_shards(w0, "reference")) == 3

  # Host 1's disk: a copy of host 0's that lost sample shard 0 and reference shard 2, which host 0
  # has. Host 0's view decides: nothing runs (a process running those batches alone would hang),
  # and process 1 gets the features its disk lacks from process 0. (Shards that process 0 lacks
  # run on both processes: tests/test_shards.py; recomputed here they would differ from the
  # 8-device run's in the last bits, since 2 x 4 devices compile otherwise.)
  shutil.copytree(w0, w1)
  _shards(w1, "samples")[0].unlink()
  _shards(w1, "reference")[2].unlink()
  for workdir in (w0, w1):
    for name in ("metrics.json", "sample_stats.npz"):
      (workdir / name).unlink()
  host1 = sorted(p.name for p in (w1 / "evaluate").rglob("*"))

  port = free_port()
  procs = []
  for i, workdir in enumerate((w0, w1)):
    cmd = _cmd(inputs, workdir)
    cmd += [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(
      start_main(
        *cmd, env=multiprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
    )
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  except subprocess.TimeoutExpired:
    pytest.fail("the two processes did not finish in 300 s (a hang: they ran different batches?)")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert [p.returncode for p in procs] == [0, 0], "\n".join(x[-3000:] for x in logs)
  for i, log in enumerate(logs):
    assert f"JAX process {i}/2, 4 local / 8 global devices (cpu)." in log
  assert "Resuming: features of 20 of 20 samples" in logs[0]
  assert "Resuming: features of 24 of 24 reference" in logs[0]

  # Process 0 wrote the outputs; both processes scored the one-process numbers (process 1 from
  # features its own disk lacks), and process 1 wrote nothing.
  with np.load(w0 / "sample_stats.npz") as z:
    np.testing.assert_array_equal(z["pool3"], want_pool3)
  got = json.loads((w0 / "metrics.json").read_text())
  assert {k: got[k] for k in METRICS} == {k: want[k] for k in METRICS}
  assert _logged_metrics(logs[1]) == {k: want[k] for k in METRICS}
  assert len(_shards(w0, "samples")) == 3
  assert sorted(p.name for p in (w1 / "evaluate").rglob("*")) == host1
  assert not os.path.exists(w1 / "metrics.json") and not os.path.exists(w1 / "sample_stats.npz")
