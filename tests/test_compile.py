"""--mode=compile: configs/tiny.py compiled for a TPU v5e 2x2 slice, on this CPU.

The compile-only TPU devices come from libtpu (setup.py's test extra, Linux x86_64 wheels only);
where it is not installed these tests skip, saying so. CPU time is kept small (about 30 s in all):
one CLI run compiles only the held-out eval step (the cheapest program) and checks what a user sees
(schema, the one-line refusal, no other file); the bytes checks call the job in this process on a
model of one device's batch, where the training state outweighs the activations as in the release
sizes. The VQ encoder (extract_encode) takes minutes of TPU compilation on 2 cores and is left out.
The persistent compilation cache does hold these TPU programs, but a cached train_k1 still costs 5
of its 6 CPU seconds here (tracing and lowering), so the tests do not rely on it.
"""

import json
import os

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from support.cli import run_main
from support.paths import ROOT

from npp_jax import chips
from npp_jax import config_lib
from npp_jax.jobs import compile as compile_job
from npp_jax.jobs import train
from npp_jax.models import gpt

needs_libtpu = pytest.mark.skipif(
  not chips.libtpu_available(),
  reason="libtpu is not installed (wheels for Linux x86_64 only): no TPU topology to compile for",
)
STEP_KEYS = {
  "step",
  "k",
  "bytes_per_device",
  "hbm_bytes_per_device",
  "fits",
  "flops",
  "bytes_accessed",
  "estimated_s",
}
# Bytes per device of train_k1 against the analytic training state on a data-parallel mesh: the
# state is an argument (its donated output aliased), so at least 1x; the gradients, AdamW's update
# and one image's activations per device add less: within 3x (1.96x measured at width 128).
MAX_FACTOR = 3.0
# tiny at width 128 with one image per device: the state outweighs the activations, as it does in
# the release sizes, so sharding it over fsdp must lower the bytes per device.
DIM, BATCH = 128, 4


def tiny(mesh, programs, **compile_knobs):
  config = config_lib.load(os.path.join(ROOT, "configs/tiny.py"))
  config.model.dim = DIM
  config.train.global_batch_size = BATCH
  config.sample.batch_size = 2 * BATCH  # Guided: twice the rows in the cache.
  config.mesh.shape = mesh
  config.compile.topology = "v5e:2x2"
  config.compile.programs = programs
  config.compile.update(compile_knobs)
  return config


def state_bytes_per_device(fsdp: int, copies: int = 3) -> float:
  """Params (+ AdamW's mu and nu: copies=3; tiny keeps no EMA) of the test's tiny (shapes from
  eval_shape), counted by hand: every >= 2-D weight is sharded over fsdp by the model's logical
  axes, the norms (1-D) are replicated."""
  config = tiny((1, fsdp, 1), ())
  assert config.optim.ema_decay == 0  # No 4th copy.
  cfg = gpt.GPTConfig.from_config(config.model)
  init_fn, rng = train.init_state(gpt.GPT(cfg), optax.sgd(1.0), cfg, 0, ema=False)
  params = nn.unbox(jax.eval_shape(init_fn, rng).params)
  per_device = 0.0
  for x in jax.tree.leaves(params):
    n = np.prod(x.shape) * x.dtype.itemsize
    per_device += n / fsdp if len(x.shape) >= 2 else n
  return copies * per_device


def check_row(step, k):
  assert set(step) == STEP_KEYS
  assert step["k"] == k
  assert step["hbm_bytes_per_device"] == 16 * 2**30  # A v5e chip.
  assert step["flops"] > 0 and step["bytes_accessed"] > 0
  # The roofline, recomputed from the row and the chip table.
  want = max(step["flops"] / 197e12, step["bytes_accessed"] / 819e9)
  np.testing.assert_allclose(step["estimated_s"], want, rtol=1e-9)


@needs_libtpu
def test_cli_reports_and_refuses_in_one_line(tmp_path):
  """A headroom that leaves less HBM than the program needs makes it a refusal: the table, one
  error line naming the program and what would fit it, exit 2, compile.json and nothing else."""
  run = run_main(
    "--mode=compile",
    "--config=configs/tiny.py",
    f"--workdir={tmp_path}",
    "--config.compile.topology=v5e:2x2",
    "--config.mesh.shape=(4,1,1)",
    "--config.compile.programs=('eval',)",
    "--config.compile.headroom=0.99999",
    timeout=600,
  )
  assert run.returncode == 2, run.stderr[-3000:]
  assert "ESTIMATED" in run.stdout and "eval" in run.stdout
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: eval needs "), last
  assert "GiB per device on v5e:2x2" in last and "to fit:" in last
  assert "--config.mesh.shape='(1,4,1)'" in last  # The state sharded over the 4 chips.
  assert sorted(os.listdir(tmp_path)) == ["compile.json"]  # No other file, no log, no cache.
  report = json.loads((tmp_path / "compile.json").read_text())
  assert report["topology"] == "v5e:2x2"
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert [s["step"] for s in report["steps"]] == ["eval"]
  check_row(report["steps"][0], 1)
  assert report["steps"][0]["fits"] is False


@needs_libtpu
def test_bytes_follow_the_state_and_fall_with_fsdp(tmp_path, capsys):
  """train_k1 and the sharded sampler's programs through the job's `run`, in this process."""
  programs = ("train_k1", "sample_prefill", "sample_decode")
  report = compile_job.run(tiny((4, 1, 1), programs), tmp_path / "dp").outputs
  out = capsys.readouterr().out
  assert set(report) == {"topology", "mesh", "steps"}
  assert json.loads((tmp_path / "dp" / "compile.json").read_text()) == report
  assert [s["step"] for s in report["steps"]] == list(programs)
  for step in report["steps"]:
    check_row(step, 1 if step["step"] == "train_k1" else None)
    assert step["fits"] is True
  train_bytes = report["steps"][0]["bytes_per_device"]
  analytic = state_bytes_per_device(1)
  assert analytic <= train_bytes <= MAX_FACTOR * analytic, (train_bytes, analytic)
  # Each sampler program holds at least the weights (float32: sample.dtype auto is the model's
  # dtype on TPU), replicated on this data-parallel mesh.
  for step in report["steps"][1:]:
    assert step["bytes_per_device"] >= state_bytes_per_device(1, copies=1)
  assert "sample_decode" in out and "one sampling batch (prefill + 255 decode steps)" in out

  # The same image per device with the state sharded 4 ways: fewer bytes per device.
  sharded = compile_job.run(tiny((1, 4, 1), ("train_k1",)), tmp_path / "fsdp").outputs
  row = sharded["steps"][0]
  assert row["bytes_per_device"] < train_bytes
  # Activations do not shrink with fsdp: only the lower bound holds at any factor.
  assert row["bytes_per_device"] >= state_bytes_per_device(4)


def test_programs_name_the_sampler_unless_sampling_is_not_set_up(tmp_path):
  config = tiny((4, 1, 1), ())
  names = compile_job.check(config, tmp_path).programs
  want = ("train_k4", "train_k2", "train_k1", "eval", "sample_prefill", "sample_decode")
  assert names == (*want, "extract_encode")
  config.model.condition = "text"  # Its training programs compile; the sampler's take labels.
  assert "sample_decode" not in compile_job.check(config, tmp_path).programs
  assert "take class labels" in compile_job.sampling_note(config)
  config.model.condition = "class"
  del config.sample
  assert "sample_decode" not in compile_job.check(config, tmp_path).programs
  assert "no `sample` section" in compile_job.sampling_note(config)
  config.compile.programs = ("sample_decode",)
  with pytest.raises(ValueError, match="compile.programs names 'sample_decode'; expected"):
    compile_job.check(config, tmp_path)


@pytest.mark.parametrize(
  "topology, message",
  [
    ("", "compile.topology is empty"),
    ("v5e:3", "compile.topology='v5e:3'; expected GENERATION:AxB"),
    ("v7x:2x2", "compile.topology='v7x:2x2'; expected"),
    ("v5p:2x2", "compile.topology='v5p:2x2'; expected"),
    ("v5e:32x32", "has 1024 chips; a v5e slice has at most 256"),
  ],
)
def test_bad_topology_is_one_line_before_any_compile(topology, message, tmp_path):
  config = config_lib.load(os.path.join(ROOT, "configs/tiny.py"))
  config.compile.topology = topology
  with pytest.raises(ValueError, match=message) as e:
    compile_job.check(config, tmp_path)
  assert "\n" not in str(e.value)
  assert not os.listdir(tmp_path)


def test_mesh_must_fit_the_slice(tmp_path):
  config = config_lib.load(os.path.join(ROOT, "configs/tiny.py"))
  config.compile.topology = "v5e:2x2"
  config.mesh.shape = (8, 1, 1)
  with pytest.raises(
    ValueError, match=r"mesh.shape=\(8, 1, 1\) needs 8 devices; v5e:2x2 has 4 chips"
  ):
    compile_job.check(config, tmp_path)


def test_slices_name_chips_and_hosts():
  s = chips.parse_slice("v5p:4x4x4")
  assert (s.num_chips, s.num_hosts, s.chip.hbm_bytes) == (64, 16, 95 * 2**30)
  assert chips.parse_slice("v5e:16x16").num_hosts == 32
  assert chips.chip_of_kind("TPU v5 lite").name == "v5e"
  assert chips.chip_of_kind("TPU v5").name == "v5p"
