"""--mode=compile: configs/tiny.py compiled for a TPU v5e 2x2 slice through the CLI, on this CPU.

The compile-only TPU devices come from libtpu (setup.py's test extra, Linux x86_64 wheels only);
where it is not installed the CLI test skips, saying so. Only train_k1 and eval are compiled: the VQ
encoder (extract_encode) takes minutes of TPU compilation on 2 cores and adds nothing checked here.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from npp_jax import chips
from npp_jax import config_lib
from npp_jax.jobs import compile as compile_job
from npp_jax.jobs import train
from npp_jax.models import gpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
# and the activations add less: within 6x (1.003x measured at width 256, 4.05x at tiny's width 64).
MAX_FACTOR = 6.0
# tiny at width 256 (7 MB of params): the state outweighs the activations of 4 images per device, as
# it does in the release sizes, so sharding it over fsdp must lower the bytes per device.
DIM = 256


def compile_cli(workdir, mesh, *extra):
  return subprocess.run(
    [
      sys.executable,
      "-m",
      "npp_jax.main",
      "--mode=compile",
      "--config=configs/tiny.py",
      f"--workdir={workdir}",
      "--config.compile.topology=v5e:2x2",
      f"--config.mesh.shape={mesh}",
      f"--config.model.dim={DIM}",
      *extra,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )


def state_bytes_per_device(fsdp: int) -> float:
  """Params, AdamW moments and EMA of tiny (shapes from eval_shape), counted by hand: every >= 2-D
  weight is sharded over fsdp by the model's logical axes, the norms (1-D) are replicated."""
  config = config_lib.load(os.path.join(ROOT, "configs/tiny.py"))
  config.model.dim = DIM
  cfg = gpt.GPTConfig.from_config(config.model)
  init_fn, rng = train.init_state(gpt.GPT(cfg), optax.sgd(1.0), cfg, 0, ema=False)
  params = nn.unbox(jax.eval_shape(init_fn, rng).params)
  per_device = 0.0
  for x in jax.tree.leaves(params):
    n = np.prod(x.shape) * x.dtype.itemsize
    per_device += n / fsdp if len(x.shape) >= 2 else n
  copies = 1 + 2 + (1 if config.optim.ema_decay > 0 else 0)  # Params, AdamW's mu and nu, EMA.
  return copies * per_device


@needs_libtpu
def test_compile_tiny_for_v5e_through_the_cli(tmp_path):
  data_parallel = compile_cli(
    tmp_path / "dp", "(4,1,1)", "--config.compile.programs=('train_k1','eval')"
  )
  assert data_parallel.returncode == 0, data_parallel.stderr[-3000:]
  assert "ESTIMATED" in data_parallel.stdout
  assert sorted(os.listdir(tmp_path / "dp")) == ["compile.json"]  # No other file, no log, no cache.
  report = json.loads((tmp_path / "dp" / "compile.json").read_text())
  assert set(report) == {"topology", "mesh", "steps"}
  assert report["topology"] == "v5e:2x2"
  assert report["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert [s["step"] for s in report["steps"]] == ["train_k1", "eval"]
  for step in report["steps"]:
    assert set(step) == STEP_KEYS
    assert step["hbm_bytes_per_device"] == 16 * 2**30  # A v5e chip.
    assert step["fits"] is True and step["k"] == 1
    assert step["flops"] > 0 and step["bytes_accessed"] > 0
    # The roofline, recomputed from the row and the chip table.
    want = max(step["flops"] / 197e12, step["bytes_accessed"] / 819e9)
    np.testing.assert_allclose(step["estimated_s"], want, rtol=1e-9)
  dp_bytes = report["steps"][0]["bytes_per_device"]
  analytic = state_bytes_per_device(1)
  assert analytic <= dp_bytes <= MAX_FACTOR * analytic, (dp_bytes, analytic)

  # The same 4 images per device with the state sharded 4 ways: fewer bytes per device. A headroom
  # that leaves less HBM than the program needs makes it a refusal: one line, exit 2, report kept.
  sharded = compile_cli(
    tmp_path / "fsdp",
    "(1,4,1)",
    "--config.compile.programs=('train_k1',)",
    "--config.compile.headroom=0.99999",
  )
  assert sharded.returncode == 2, sharded.stderr[-3000:]
  last = sharded.stderr.strip().splitlines()[-1]
  assert last.startswith("error: train_k1 needs "), last
  assert "per device on v5e:2x2" in last and "to fit:" in last
  assert "--config.model.remat=full" in last
  assert sorted(os.listdir(tmp_path / "fsdp")) == ["compile.json"]
  row = json.loads((tmp_path / "fsdp" / "compile.json").read_text())["steps"][0]
  assert row["fits"] is False
  assert row["bytes_per_device"] < dp_bytes
  # Activations do not shrink with fsdp: only the lower bound holds at any factor.
  assert row["bytes_per_device"] >= state_bytes_per_device(4)


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
