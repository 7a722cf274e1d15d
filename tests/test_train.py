"""The trainer end to end on 8 fake CPU devices: meshes, stages, resume after SIGKILL, accumulation,
EMA, and every bad input it must refuse before compiling or writing."""

import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import time

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support.cli import start_main
from support.codes import dataset as shared_dataset
from support.codes import make_codes
from support.scalars import read_scalars

from npp_jax import checkpoints
from npp_jax import config_lib
from npp_jax import costs
from npp_jax import jobs
from npp_jax import loop
from npp_jax.data import code_dataset
from npp_jax.jobs import train
from npp_jax.models import gpt

# The module-scoped code data set of 64 images (support/codes.py): pytest finds a fixture by
# its name in the module.
dataset = shared_dataset


def tiny(dataset, **overrides):
  c = config_lib.load("configs/tiny.py")
  c.data.path = dataset
  c.update_from_flattened_dict(overrides)  # {'train.max_steps': 2, ...}
  return c


def _plan(c):
  """The trainer's plan of a config (its check, with a workdir that is never made)."""
  return train.check(c, "/tmp/npp_jax_unused_workdir", jobs.Topology(jax.device_count(), 1))


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1)])
def test_tiny_training_learns_and_switches_stages(dataset, tmp_path, mesh_shape):
  c = tiny(dataset, **{"mesh.shape": mesh_shape, "train.epochs": 8})
  workdir = str(tmp_path / "run")
  p = _plan(c)
  assert [(s.k, s.start_step, s.end_step) for s in p.schedule.stages] == [
    (4, 0, 8),
    (2, 8, 16),
    (1, 16, 32),
  ]
  out = train.run(c, workdir).outputs
  assert out["step"] == 32 and out["k"] == 1
  # A fresh model predicts uniform: log(256) = 5.55. The learnable codes must go well below.
  assert out["loss"] < 4.0, out
  assert 0 < out["relative_cost"] < 1
  # Stage switch: the logged k went 4 -> 2 -> 1 (TensorBoard events in the workdir).
  ks = dict(read_scalars(workdir)["k"])
  assert [ks[s] for s in (1, 8, 9, 16, 17, 32)] == [4, 4, 2, 2, 1, 1]
  # FSDP over 4 devices: the embedding table is split along its embed axis.
  params = checkpoints.load_params(workdir)
  chex.assert_tree_all_finite(params)


def _run_main(workdir, dataset, extra=(), wait=True):
  proc = start_main(
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.data.path={dataset}",
    "--config.mesh.shape=(8,1,1)",
    *extra,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  if wait:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
  return proc


@pytest.fixture(scope="module")
def uninterrupted(dataset, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full") / "run")
  _run_main(workdir, dataset)
  return workdir


@pytest.mark.parametrize("kill_after_checkpoint", [4, 12])  # In stage k=4 and in stage k=2.
def test_sigkill_and_resume_is_bit_exact(dataset, uninterrupted, tmp_path, kill_after_checkpoint):
  workdir = str(tmp_path / "run")
  proc = _run_main(workdir, dataset, wait=False)
  ckpt = os.path.join(workdir, "checkpoints", str(kill_after_checkpoint))
  deadline = time.time() + 240
  while not os.path.isdir(ckpt) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), keep=3).latest_step()
  assert killed_at is not None and killed_at < 32
  _run_main(workdir, dataset)  # The same command resumes.
  a = checkpoints.load_params(uninterrupted)
  b = checkpoints.load_params(workdir)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_sigterm_saves_and_stops_then_resumes(dataset, uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  proc = _run_main(workdir, dataset, wait=False)
  ckpt = os.path.join(workdir, "checkpoints", "4")
  while not os.path.isdir(ckpt) and proc.poll() is None:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  # A status a launcher tells from "finished" (0): saved, stopped early, run the same command again.
  assert proc.returncode == loop.EXIT_PREEMPTED, out[-2000:]
  assert "Preemption requested" in out
  _run_main(workdir, dataset)
  jax.tree.map(
    lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
    checkpoints.load_params(uninterrupted),
    checkpoints.load_params(workdir),
  )


def test_sigterm_before_the_loop_saves_the_first_step(dataset, tmp_path, monkeypatch):
  """A SIGTERM while the state is built (or restored, or compiled) is a stop request, not death."""
  build = train._build

  def build_then_sigterm(*args):
    out = build(*args)
    os.kill(os.getpid(), signal.SIGTERM)
    return out

  monkeypatch.setattr(train, "_build", build_then_sigterm)
  workdir = tmp_path / "run"
  result = train.run(tiny(dataset), str(workdir))
  assert result.stopped_early and result.outputs["step"] == 1
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1"]


def _one_step(c, batch, accum):
  p = _plan(c)
  model = gpt.GPT(p.model)
  _, lr_fn = train.make_optimizer(c, p.schedule)
  # Plain SGD: the new parameters are linear in the gradients (Adam's first step is ~sign(g), which
  # amplifies rounding on near-zero gradients).
  tx = optax.sgd(1.0)
  init_fn, rng = train.init_state(model, tx, p.model, 0, ema=False)
  state = nn.unbox(init_fn(rng))
  # Give the output layer weights so every parameter gets a gradient.
  state = state.replace(params=jax.tree.map(lambda x: x + 0.01, state.params))
  step = jax.jit(
    functools.partial(train.train_step, model=model, tx=tx, lr_fn=lr_fn, k=2, accum=accum)
  )
  return step(state, batch)


def test_gradient_accumulation_equals_the_big_batch(dataset):
  # No label drop: its random draws differ per micro-batch, and this compares the arithmetic only.
  c = tiny(dataset, **{"train.global_batch_size": 32, "model.class_dropout": 0.0})
  codes, labels = make_codes(32, seed=5)
  batch = {"codes": jnp.asarray(codes[:, 0]), "labels": jnp.asarray(labels)}
  s1, m1 = _one_step(c, batch, accum=1)
  c.train.grad_accum_steps = 4
  s4, m4 = _one_step(c, batch, accum=4)
  # Mean of 4 equal micro-batch means = the batch mean. The micro-batches change the matmul shapes,
  # so XLA sums in another order: fp32 agreement to 5e-5 relative.
  np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=5e-5)
  np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
    s4.params,
    s1.params,
  )


def test_ema_matches_numpy(dataset):
  c = tiny(dataset)
  decay = 0.9
  p = _plan(c)
  model = gpt.GPT(p.model)
  tx, lr_fn = train.make_optimizer(c, p.schedule)
  init_fn, rng = train.init_state(model, tx, p.model, 0, ema=True)
  state = nn.unbox(init_fn(rng))
  step = jax.jit(
    functools.partial(
      train.train_step, model=model, tx=tx, lr_fn=lr_fn, k=1, accum=1, ema_decay=decay
    )
  )
  ref = jax.tree.map(lambda x: np.asarray(x, np.float64), state.params)
  for i in range(3):
    codes, labels = make_codes(16, seed=i)
    state, _ = step(state, {"codes": jnp.asarray(codes[:, 0]), "labels": jnp.asarray(labels)})
    ref = jax.tree.map(
      lambda e, q: decay * e + (1 - decay) * np.asarray(q, np.float64), ref, state.params
    )
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-7), state.ema, ref
  )


# ---------------------------------------------------------------------------------------- bad input

BAD = [
  ({"model.name": "GPT-Q"}, "unknown model.name='GPT-Q'"),
  ({"npp.stages": ((3, 1), (1, 1))}, "patch size k=3"),
  ({"train.global_batch_size": 12}, "does not split over the data-parallel size 8"),
  ({"mesh.shape": (3, 1, 1)}, r"mesh.shape=\(3, 1, 1\) needs 3 devices; found 8"),
  ({"model.vocab_size": 100}, "holds code 2[0-9][0-9]; expected codes < model.vocab_size=100"),
  ({"model.num_classes": 5}, "holds label 9; expected labels < model.num_classes=5"),
  (
    {"model.condition": "text", "model.cls_token_num": 8, "model.caption_dim": 32},
    "is a class code data set; expected a caption code data set",
  ),
  ({"data.path": "/nonexistent/codes"}, "/nonexistent/codes"),
  ({"data.path": ""}, "data.path is empty"),
  ({"optim.lr": 0.0}, "optim.lr=0.0; expected a positive number"),
  ({"optim.lr": -1e-4}, "optim.lr=-0.0001"),
  ({"train.epochs": 0}, "train.epochs=0"),
  ({"train.global_batch_size": 0}, "train.global_batch_size=0"),
  ({"npp.epoch_rate": 1.5}, "npp.epoch_rate=1.5; expected a number in \\(0, 1\\)"),
  ({"npp.epoch_rate": 0.0}, "npp.epoch_rate=0.0"),
  ({"model.grid": (8, 8)}, "holds 16x16 code grids; expected model.grid=\\(8, 8\\)"),
  ({"data.eval_split": "valid"}, "has no finished split 'valid'"),
  ({"train.eval_batches": -1}, "train.eval_batches=-1; expected an integer >= 0"),
  # Once checked by the command line only: the loop divided by it after the first compile.
  ({"train.log_every_steps": 0}, "train.log_every_steps=0; expected a positive integer"),
]


@pytest.mark.parametrize("overrides, match", BAD)
def test_bad_input_fails_before_anything_is_written(dataset, tmp_path, overrides, match):
  c = tiny(dataset, **overrides)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match):
    train.run(c, str(workdir))
  assert not workdir.exists()


def test_empty_dataset_is_refused(tmp_path):
  path = str(tmp_path / "empty")
  with pytest.raises(ValueError):
    code_dataset.write_code_dataset(
      path,
      np.zeros((0, 1, 16, 16), np.int32),
      np.zeros((0,), np.int32),
      vocab_size=256,
      num_classes=10,
    )
  c = tiny(path)
  with pytest.raises(ValueError, match=path):
    train.run(c, str(tmp_path / "run"))


def test_workdir_of_another_model_is_refused(dataset, uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(uninterrupted, workdir)
  c = tiny(dataset, **{"model.dim": 32})
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  with pytest.raises(ValueError, match="another model .*dim: checkpoint 64 vs config 32"):
    train.run(c, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_corrupt_checkpoint_is_reported_and_kept(dataset, uninterrupted, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(uninterrupted, workdir)
  latest = os.path.join(workdir, "checkpoints", "32", "state")
  # Truncate every data file of the latest state: a disk that filled up mid-write.
  damaged = []
  for root, _, files in os.walk(latest):
    for f in files:
      full = os.path.join(root, f)
      if os.path.getsize(full) > 64:
        with open(full, "r+b") as fh:
          fh.truncate(16)
        damaged.append(full)
  assert damaged
  snapshot = {f: open(f, "rb").read() for f in damaged}
  c = tiny(dataset, **{"train.epochs": 10})
  with pytest.raises(ValueError, match="checkpoint step 32 .* corrupt or partial"):
    train.run(c, workdir)
  assert {f: open(f, "rb").read() for f in damaged} == snapshot


def test_non_finite_step_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
  workdir = str(tmp_path / "run")
  train.run(tiny(dataset, **{"train.max_steps": 2, "train.checkpoint_every_steps": 2}), workdir)
  good = checkpoints.load_params(workdir)
  # lr 1e30 blows the weights up at the next update (their norm overflows fp32). The log interval
  # (100) never comes; the checkpoint interval (1) does, and the check before every save must stop
  # it.
  c = tiny(
    dataset,
    **{
      "optim.lr": 1e30,
      "optim.end_lr": 0.0,
      "train.log_every_steps": 100,
      "train.checkpoint_every_steps": 1,
    },
  )
  with pytest.raises(
    FloatingPointError, match="non-finite metrics at step 3 .*last good checkpoint is step 2"
  ):
    train.run(c, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  jax.tree.map(np.testing.assert_array_equal, checkpoints.load_params(workdir), good)


def test_init_from_loads_parameters(dataset, uninterrupted, tmp_path):
  c = tiny(
    dataset,
    **{
      "train.init_from": uninterrupted,
      "train.max_steps": 1,
      "optim.lr": 1e-12,
      "optim.end_lr": 0.0,
    },
  )
  train.run(c, str(tmp_path / "run"))
  a, b = checkpoints.load_params(uninterrupted), checkpoints.load_params(str(tmp_path / "run"))
  jax.tree.map(
    lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6), a, b
  )
  c = tiny(dataset, **{"train.init_from": uninterrupted, "model.dim": 32})
  with pytest.raises(ValueError, match="holds parameters of another model"):
    train.run(c, str(tmp_path / "run2"))


# ------------------------------------------------------------------------------ held-out evaluation


@pytest.fixture(scope="module")
def dataset_with_test(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("codes_eval") / "ds")
  codes, labels = make_codes(64)
  code_dataset.write_code_dataset(path, codes, labels, vocab_size=256, num_classes=10)
  codes, labels = make_codes(21, seed=7)  # 21 images: the second eval batch of 16 is padded.
  code_dataset.write_code_dataset(path, codes, labels, vocab_size=256, num_classes=10, split="test")
  return path, codes[:, 0], labels


@pytest.mark.parametrize(
  "mesh_shape, eval_batches, n_images", [((8, 1, 1), 2, 21), ((2, 4, 1), 1, 16)]
)
def test_held_out_eval_matches_numpy(
  dataset_with_test, tmp_path, mesh_shape, eval_batches, n_images
):
  path, codes, labels = dataset_with_test
  c = tiny(
    path,
    **{
      "mesh.shape": mesh_shape,
      "train.max_steps": 9,
      "train.eval_every_steps": 3,
      "train.eval_batches": eval_batches,
      "train.checkpoint_every_steps": 9,
    },
  )
  workdir = str(tmp_path / "run")
  out = train.run(c, workdir).outputs
  scalars = read_scalars(workdir)
  # Every 3 steps, at the end of stage k=4 (step 8) and at the end of the run.
  assert [s for s, _ in scalars["eval/nll"]] == [3, 6, 8, 9]
  p = _plan(c)
  cfg = dataclasses.replace(p.model, scan_layers=False)
  params = checkpoints.load_params(workdir)  # Step 9's: the last evaluation's parameters.
  codes, labels = codes[:n_images], labels[:n_images]
  # clu's parameter table of the run, in the workdir (not on the console).
  count = sum(x.size for x in jax.tree.leaves(params))
  assert f"Total: {count:,}" in open(os.path.join(workdir, "parameters.txt")).read()

  def image_nll(
    lbls,
  ):  # The model's k = 1 logits, then a float64 NumPy log-softmax: nats per image.
    logits = np.asarray(
      gpt.GPT(cfg).apply({"params": params}, jnp.asarray(codes), jnp.asarray(lbls), patch_size=1),
      np.float64,
    )
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, codes.reshape(len(codes), -1, 1), -1)[..., 0].sum(-1)

  cond, null = image_nll(labels), image_nll(np.full_like(labels, 10))
  want_nll, want_info = cond.mean() / 256, (null - cond).mean()
  np.testing.assert_allclose(dict(scalars["eval/nll"])[9], want_nll, rtol=1e-5)
  np.testing.assert_allclose(dict(scalars["eval/class_info"])[9], want_info, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(out["eval/nll"], want_nll, rtol=1e-5)
  assert abs(want_info) > 0.05, (
    want_info
  )  # The labels matter to the model: the check above is not 0 == 0.
  assert dict(scalars["eval/relative_cost"])[8] == pytest.approx(
    costs.cumulative_relative_cost(p.schedule, p.model, 8), rel=1e-6
  )
