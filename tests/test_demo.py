"""The first-run experience: the demo end to end (shrunk) and its resume (the notebook:
test_notebook.py)."""

import json
import os

import numpy as np
from PIL import Image
import pytest
from support.cli import run_main

ROWS = ("npp", "ntp", "ntp_equal_compute")


def run_demo(workdir, *overrides):
  cmd = ["--mode=demo", "--config=configs/demo.py:smoke", f"--workdir={workdir}", *overrides]
  # One CPU device, as on the laptop the demo is for (sharding has its own tests): on the 8 fake
  # devices of the test processes every one of the demo's many small programs compiles and runs
  # partitioned.
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = run_main(*cmd, env=env, timeout=1800)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  return out.stdout, out.stderr


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo") / "run")
  return (workdir, *run_demo(workdir))


def test_demo_reports_three_rows_with_calibration(demo_run):
  workdir, stdout, stderr = demo_run
  for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
    assert f"=== {stage}" in stdout
  report = json.load(open(os.path.join(workdir, "report.json")))
  for name in ROWS:
    r = report[name]
    assert (
      r["wall_s"] > 0
      and 0.0 <= r["accuracy"] <= 1.0
      and np.isfinite(r["frechet"])
      and r["frechet"] >= 0
    )
    assert np.isfinite(r["eval_nll"]) and r["eval_nll"] > 0 and np.isfinite(r["class_info"]), r
  npp, ntp, equal = (report[n] for n in ROWS)
  assert npp["relative_cost"] < 0.7 and ntp["relative_cost"] == 1.0
  # Equal compute: next-token epochs in proportion to the measured wall times of the first two rows.
  assert equal["epochs"] == pytest.approx(ntp["epochs"] * npp["wall_s"] / ntp["wall_s"], abs=0.01)
  cal = report["calibration"]
  assert cal["chance_accuracy"] == 0.1 and cal["real_test_accuracy"] > 0.5
  assert 0.0 <= cal["vq_reconstruction_accuracy"] <= 1.0 and cal["real_frechet"] >= 0
  # The table, with a line per row and the calibration lines, on the console.
  for text in (
    "NPP",
    "next-token, same epochs",
    "next-token, NPP's wall time",
    "chance 0.10",
    "(ceiling)",
    "(floor)",
  ):
    assert text in stdout, text


def test_demo_console_is_readable_and_outputs_exist(demo_run):
  workdir, stdout, stderr = demo_run
  # Library INFO chatter (absl, orbax, tfds) goes to the log file, not the console.
  console = stdout + stderr
  assert not any(
    line.startswith("I1") or line.startswith("INFO") for line in console.splitlines()
  ), console[-3000:]
  log = open(os.path.join(workdir, "log.txt")).read()
  assert "Demo stage 3/5" in log and len(log.splitlines()) > 20
  # A progress bar per training stage (tqdm writes to stderr): VQ and the three GPTs.
  for name in ("VQ", "npp (k=", "ntp (k=1", "ntp_equal_compute (k=1"):
    assert name in stderr, name
  # PNG grids: upscaled, a row of real digits plus one per class, a label column and a title.
  scale = 3  # configs/demo.py: demo.png_scale
  for name in ROWS:
    png = Image.open(os.path.join(workdir, f"samples_{name}.png"))
    assert png.size[1] > 11 * 32 * scale and png.size[0] > 8 * 32 * scale
  # The same grids in TensorBoard, beside each GPT run's scalars; VQ reconstructions under the VQ
  # run.
  from tensorboard.backend.event_processing import event_accumulator

  for run, tag in (("npp", "samples"), ("ntp_equal_compute", "samples"), ("vq", "reconstructions")):
    acc = event_accumulator.EventAccumulator(
      os.path.join(workdir, run), size_guidance={"images": 0}
    )
    acc.Reload()
    assert tag in acc.Tags()["images"], (run, acc.Tags())


def test_demo_rerun_resumes_and_seeds_flag_adds_a_spread(demo_run):
  """Run again with --config.demo.seeds=2: seed 0's runs are reused as they are (nothing retrained
  or resampled) and a second seed's are added; each row reports means and half-ranges over the
  two."""
  workdir, _, _ = demo_run
  before = json.load(open(os.path.join(workdir, "report.json")))
  stdout, _ = run_demo(workdir, "--config.demo.seeds=2")
  for name in ROWS:
    assert f"{name}: already trained" in stdout
  report = json.load(open(os.path.join(workdir, "report.json")))
  assert report["seeds"] == 2 and "mean±half-range" in stdout
  for name in ROWS:
    r = report[name]
    assert r["per_seed"][0] == before[name]  # Seed 0 is the first run's, number for number.
    accs = [s["accuracy"] for s in r["per_seed"]]
    assert len(accs) == 2 and r["accuracy"] == pytest.approx(np.mean(accs), abs=1e-4)
    assert r["spread"]["accuracy"] == pytest.approx((max(accs) - min(accs)) / 2, abs=1e-4)
    assert r["per_seed"][1]["seed"] == r["per_seed"][0]["seed"] + 1
