"""The first-run experience: the demo end to end (shrunk) and its resume (the notebook: test_notebook.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_demo(workdir):
  cmd = [sys.executable, "-m", "npp_jax.main", "--mode=demo", "--config=configs/demo.py:smoke",
         f"--workdir={workdir}"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  return out.stdout + out.stderr


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo") / "run")
  return workdir, run_demo(workdir)


def test_demo_runs_every_stage_and_reports(demo_run):
  workdir, log = demo_run
  for stage in ("1/5", "2/5", "3/5", "4/5", "5/5"):
    assert f"=== {stage}" in log
  report = json.load(open(os.path.join(workdir, "report.json")))
  for name in ("npp", "ntp"):
    r = report[name]
    assert r["wall_s"] > 0 and 0.0 <= r["accuracy"] <= 1.0 and np.isfinite(r["frechet"]) and r["frechet"] >= 0
  assert report["npp"]["relative_cost"] < 0.7 and report["ntp"]["relative_cost"] == 1.0
  # One PNG row per digit class.
  png = Image.open(os.path.join(workdir, "samples_npp.png"))
  assert png.size[1] >= 10 * 32
  # TensorBoard logs of the GPT runs.
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "npp")))


def test_demo_rerun_resumes_instead_of_starting_over(demo_run):
  workdir, _ = demo_run
  before = json.load(open(os.path.join(workdir, "report.json")))
  log = run_demo(workdir)
  assert "already trained" in log
  after = json.load(open(os.path.join(workdir, "report.json")))
  # Nothing retrained or resampled: the same numbers come back.
  assert after["npp"] == before["npp"] and after["ntp"] == before["ntp"]
