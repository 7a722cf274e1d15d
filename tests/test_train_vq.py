"""VQ training on 8 fake CPU devices: learns, logs codebook usage, resumes, is not redone, saves and
stops on SIGTERM, refuses bad inputs before anything is written, and its workdir exports to
PyTorch."""

import os
import shutil
import signal

import jax
import numpy as np
import pytest
from support.configs import tiny_vq_config
from support.paths import TESTS
from support.scalars import read_scalars

from npp_jax import checkpoints
from npp_jax.jobs import train_vq
from npp_jax.models import vq

# ----------------------------------------------------------------------------------------- train_vq


def test_train_vq_learns_logs_usage_resumes_and_is_not_redone(tmp_path):
  workdir = str(tmp_path / "w")
  c = tiny_vq_config()
  out = train_vq.run(c, workdir).outputs["vq"]
  assert out == os.path.join(workdir, "vq")
  params = checkpoints.read_params(out)
  checkpoints.check_param_shapes(params, vq.param_shapes(c.vq), out)
  scalars = read_scalars(workdir)
  losses = [v for _, v in scalars["loss"]]
  assert len(losses) == 6 and np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  for tag in ("usage_batch", "perplexity_running", "perplexity_batch"):
    values = [v for _, v in scalars[tag]]
    assert len(values) == 6
  assert all(0 < v <= 1 for _, v in scalars["usage_batch"])
  assert all(1 <= v <= 64 for _, v in scalars["perplexity_running"])
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "vq_checkpoints")) if s.isdigit())
  assert steps == [3, 6]

  # Finished: a re-run returns the same parameters without a step.
  events = sorted(os.listdir(workdir))
  assert train_vq.run(c, workdir).outputs["vq"] == out
  assert sorted(os.listdir(workdir)) == events
  # A longer run resumes from step 6 (final params removed, as if the run had never finished).
  shutil.rmtree(out)
  train_vq.run(
    tiny_vq_config(**{"vq_train.steps": 8, "vq_train.checkpoint_every_steps": 4}), workdir
  )
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "vq_checkpoints")) if s.isdigit())
  assert steps == [6, 8]
  new_steps = sorted(s for s, _ in read_scalars(workdir)["loss"])
  assert new_steps[-2:] == [7, 8] and new_steps.count(7) == 1


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
  """(workdir, final parameters) of a run of the SIGTERM test's config that nothing interrupts;
  it keeps steps 4 and 6 (test_a_vq_workdir_exports_to_torch_and_params reads them)."""
  c = tiny_vq_config(**{"vq_train.checkpoint_every_steps": 4})
  workdir = str(tmp_path_factory.mktemp("vq") / "w")
  return workdir, checkpoints.read_params(train_vq.run(c, workdir).outputs["vq"])


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run):
  return uninterrupted_run[1]


def test_train_vq_saves_and_stops_on_sigterm_then_resumes(tmp_path, monkeypatch, uninterrupted):
  workdir = str(tmp_path / "w")
  c = tiny_vq_config(**{"vq_train.checkpoint_every_steps": 100})
  real = train_vq._vq_batches

  def batches_then_sigterm(*args, **kw):
    for i, batch in enumerate(real(*args, **kw)):
      if i == 2:  # As a scheduler would: the loop saves the step it is at and returns.
        os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  monkeypatch.setattr(train_vq, "_vq_batches", batches_then_sigterm)
  assert train_vq.run(c, workdir).stopped_early
  steps = [int(s) for s in os.listdir(os.path.join(workdir, "vq_checkpoints")) if s.isdigit()]
  assert len(steps) == 1 and 1 <= steps[0] < 6
  assert not os.path.exists(os.path.join(workdir, "vq"))
  monkeypatch.setattr(train_vq, "_vq_batches", real)
  assert train_vq.run(c, workdir).outputs["vq"] == os.path.join(workdir, "vq")
  assert max(s for s, _ in read_scalars(workdir)["loss"]) == 6
  # Resume is bit-exact: the same batches (drawn per step) from the same restored state.
  resumed = checkpoints.read_params(os.path.join(workdir, "vq"))
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted)


def test_train_vq_refuses_bad_input_before_writing(tmp_path):
  workdir = str(tmp_path / "w")
  for overrides, match in (
    ({"vq_train.dataset": "no_such_dataset_xyz"}, "not a TFDS data set"),
    ({"vq_train.dataset": "/no/such/folder"}, "does not exist"),
    ({"vq_train.batch_size": 12}, "data-parallel size 8"),
    ({"vq_train.l2_weight": 0.0}, "both 0"),
    ({"vq_train.split": "valid"}, "expected one of"),
    ({"vq.norm_groups": 5}, "norm_groups"),
  ):
    c = tiny_vq_config(**overrides)
    with pytest.raises(ValueError, match=match) as e:
      train_vq.run(c, workdir)
    assert "\n" not in str(e.value)
    assert not os.path.exists(workdir)


def test_a_vq_workdir_exports_to_torch_and_params(tmp_path, uninterrupted_run):
  """`convert --kind=vq --src=WORKDIR`: the final weights as a .pt the release's VQModel loads
  strictly (and converts back to them bit for bit), --step=4 a kept step, --to=params a params
  directory of the weights the step holds."""
  torch = pytest.importorskip("torch")
  from support import torch_reference as ref

  from npp_jax import convert

  workdir, uninterrupted = uninterrupted_run
  config_file = tmp_path / "tiny_vq.py"
  config_file.write_text(
    f"import sys\nsys.path.insert(0, {TESTS!r})\n"
    "from support.configs import tiny_vq_config\n\n\ndef get_config():\n  return tiny_vq_config()\n"
  )
  base = ["convert", "--kind=vq", f"--config={config_file}"]
  convert.run([*base, f"--src={workdir}", "--to=torch", f"--dst={tmp_path / 'vq.pt'}"])
  v = tiny_vq_config().vq
  model = ref.VQModel(
    v.codebook_size,
    v.codebook_embed_dim,
    v.z_channels,
    v.ch,
    v.ch_mult,
    v.num_res_blocks,
    v.norm_groups,
  )
  model.load_state_dict(torch.load(tmp_path / "vq.pt", weights_only=True)["model"], strict=True)
  convert.run([*base, f"--src={tmp_path / 'vq.pt'}", f"--dst={tmp_path / 'back'}"])
  jax.tree.map(
    np.testing.assert_array_equal, checkpoints.read_params(str(tmp_path / "back")), uninterrupted
  )
  # A kept step, as a params directory: step 4's weights, not the final ones.
  convert.run([*base, f"--src={workdir}", "--step=4", "--to=params", f"--dst={tmp_path / 's4'}"])
  step4 = checkpoints.read_params(str(tmp_path / "s4"))
  want = checkpoints.checkpoint_params(os.path.join(workdir, "vq_checkpoints"), step=4)
  jax.tree.map(np.testing.assert_array_equal, step4, want)
  assert not np.array_equal(step4["quantize"]["embedding"], uninterrupted["quantize"]["embedding"])
