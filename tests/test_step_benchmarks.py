"""benchmarks/train_step.py and benchmarks/cpu_roofline.py cannot rot: each runs here as a user runs
it (a tiny config, few steps) and its one JSON line is checked for every k's figures. Their speed is
never asserted (docs/performance.md holds the figures)."""

import json
import os
import subprocess
import sys

import pytest
from support.paths import ROOT

KS = (1, 2, 4)


def _run(script: str, *args: str) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  out = subprocess.run(
    [sys.executable, os.path.join("benchmarks", script), "--config=configs/tiny.py", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 1, out.stdout
  return json.loads(lines[0])


@pytest.mark.parametrize(
  "script, args, fields",
  [
    ("train_step.py", ("--batch=4", "--steps=1"), ("compile_s", "step_s", "tokens_per_s", "gflop")),
    (
      "cpu_roofline.py",
      ("--batch=4", "--matmul=128", "--mib=8", "--repeats=1", "--time", "--steps=1"),
      ("gflop", "gb_accessed", "estimated_s", "step_s", "measured_over_estimate"),
    ),
  ],
)
def test_step_benchmark_prints_every_k(script, args, fields):
  line = _run(script, *args)
  assert line["config"] == "configs/tiny.py" and line["batch"] == 4
  assert line["device"].startswith("cpu (") and line["date"]
  for k in KS:
    for f in fields:
      value = line[f"{f}_k{k}"]
      assert isinstance(value, (int, float)) and value >= 0, (f, k, value)
  assert line["step_s_k1"] > 0
