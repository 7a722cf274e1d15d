"""Training a text model on a caption code data set (data/captions.py) with configs/tiny.py:text:
it learns through the NPP stages, evaluates with and without the caption, keeps the null caption
fixed, a SIGTERM'd run resumes bit-exactly through the real CLI, the workdir exports to the
release's t2i layout, two processes train as one; bad data sets one line each."""

import os
import signal
import subprocess
import time

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from support.cli import finish
from support.cli import free_port
from support.cli import multiprocess_env
from support.cli import start_main

from npp_jax import checkpoints
from npp_jax import config_lib
from npp_jax import jobs
from npp_jax import loop
from npp_jax.data import captions
from npp_jax.jobs import train
from npp_jax.models import gpt

N, T, DIM, VOCAB = 64, 8, 32, 256


def caption_examples(n, seed):
  """Learnable: the caption names one of 10 patterns (its features a fixed vector per pattern,
  of varying length), the codes draw that pattern with noise; examples 5 and 11 are invalid."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, size=n)
  rows, cols = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
  base = (labels[:, None, None] * 23 + rows[None] * 3 + cols[None]) % VOCAB
  codes = np.stack([(base + rng.integers(0, 2, size=base.shape) + a) % VOCAB for a in range(2)], 1)
  words = np.random.default_rng(99).normal(size=(10, T, DIM)).astype(np.float32)
  feats = words[labels] + 0.1 * rng.normal(size=(n, T, DIM)).astype(np.float32)
  lengths = rng.integers(2, T + 1, size=n)
  valid = np.ones(n, bool)
  valid[[5, 11]] = False
  return codes, feats, lengths, [f"pattern {i}" for i in labels], valid


def write(path, split, n, seed, **kw):
  with captions.CaptionDatasetWriter(
    path, (16, 16), 2, VOCAB, kw.get("dim", DIM), max_length=T, split=split
  ) as w:
    codes, feats, lengths, texts, valid = caption_examples(n, seed)
    w.add(codes, feats[..., : kw.get("dim", DIM)], lengths, texts, valid)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("captions") / "ds")
  write(path, "train", N, 0)
  write(path, "test", 16, 1)
  return path


def tiny_text(dataset, **overrides):
  c = config_lib.load("configs/tiny.py:text")
  c.data.path = dataset
  c.update_from_flattened_dict(overrides)
  return c


def test_text_training_learns_switches_stages_and_evaluates(dataset, tmp_path):
  c = tiny_text(dataset, **{"mesh.shape": (2, 4, 1), "train.eval_batches": 1})
  p = train.check(c, str(tmp_path / "run"), jobs.Topology(jax.device_count(), 1))
  assert [(s.k, s.end_step) for s in p.schedule.stages] == [(4, 8), (2, 16), (1, 32)]
  out = train.run(c, str(tmp_path / "run")).outputs
  assert out["step"] == 32 and out["k"] == 1
  assert out["loss"] < 4.0, out  # Uniform is log(256) = 5.55.
  assert out["eval/nll"] < 4.0 and out["eval/class_info"] > 0, out  # The caption helps.
  params = checkpoints.load_params(str(tmp_path / "run"))
  chex.assert_tree_all_finite(params)
  # The null caption is the one drawn at init. The run drew it sharded (jit on the mesh), this
  # reference on one device, and XLA may round the draw 1 ulp apart; that it stays bit-exact
  # through training is test_train_text's null-caption test.
  cfg = gpt.GPTConfig.from_config(c.model)
  init_fn, rng = train.init_state(gpt.GPT(cfg), optax.sgd(1.0), cfg, c.seed, ema=False)
  start = nn.unbox(init_fn(rng)).params["cls_embedding"]["uncond_embedding"]
  got = params["cls_embedding"]["uncond_embedding"]
  np.testing.assert_allclose(got, np.asarray(start), rtol=1e-6, atol=1e-7)


def _command(workdir, dataset):
  """The CLI run every test here shares (16 steps through the three stages, no evaluation)."""
  return [
    "--config=configs/tiny.py:text",
    f"--workdir={workdir}",
    f"--config.data.path={dataset}",
    "--config.mesh.shape=(8,1,1)",
    "--config.train.epochs=4",
    "--config.train.eval_batches=0",
  ]


def _run_main(workdir, dataset, wait=True):
  proc = start_main(
    *_command(workdir, dataset),
    env=multiprocess_env(1),
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )
  if wait:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
  return proc


@pytest.fixture(scope="module")
def full_run(dataset, tmp_path_factory):
  """One uninterrupted CLI run of the tiny text model (16 steps), shared: the reference of the
  SIGTERM'd run and of the two-process run, and the workdir the export test converts."""
  workdir = str(tmp_path_factory.mktemp("full") / "run")
  _run_main(workdir, dataset)
  return workdir


def test_sigterm_saves_and_stops_then_resumes_bit_exact(dataset, full_run, tmp_path):
  full = full_run
  workdir = str(tmp_path / "run")
  proc = _run_main(workdir, dataset, wait=False)
  deadline = time.time() + 240
  while not os.path.isdir(os.path.join(workdir, "checkpoints", "4")) and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == loop.EXIT_PREEMPTED, out[-2000:]
  _run_main(workdir, dataset)  # The same command resumes.
  jax.tree.map(
    lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
    checkpoints.load_params(full),
    checkpoints.load_params(workdir),
  )


def test_bad_caption_data_sets_fail_before_anything_is_written(dataset, tmp_path):
  wide = str(tmp_path / "wide")
  write(wide, "train", 16, 0, dim=DIM - 8)
  cases = [
    (
      tiny_text(wide),
      "holds captions of 8 x 24 features; expected model.cls_token_num=8 x model.caption_dim=32",
    ),
    (tiny_text(dataset, **{"model.cls_token_num": 6}), "holds captions of 8 x 32 features"),
    (tiny_text(dataset, **{"model.condition": "class", "model.cls_token_num": 1}), "is a caption"),
    (
      tiny_text(dataset, **{"evaluate.every_steps": 10}),
      "evaluate.every_steps=10 with model.condition='text'; expected 0",
    ),
  ]
  for config, match in cases:
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match=match) as e:
      train.run(config, str(workdir))
    assert "\n" not in str(e.value) and not workdir.exists()


def test_a_text_workdir_exports_to_the_release_t2i_layout(full_run, tmp_path):
  """`convert --to=torch --src=WORKDIR` with the text config: a state dict LlamaGen's t2i class
  (support/torch_reference.py) loads strictly, null caption included, with the logits of the run's
  weights on padded captions and null rows (1e-4 relative, as tests/test_convert_t2i.py)."""
  torch = pytest.importorskip("torch")
  from support import torch_reference as ref
  from support.conversion import rel_err
  from support.conversion import run_convert

  pt = tmp_path / "t2i.pt"
  run_convert(
    "--kind=gpt", f"--src={full_run}", "--config=configs/tiny.py:text", f"--dst={pt}", "--to=torch"
  )
  config = config_lib.load("configs/tiny.py:text")
  m = config.model
  model = ref.GPT(
    m.n_layer,
    m.n_head,
    m.dim,
    m.vocab_size,
    m.num_classes,
    m.grid,
    multiple_of=m.multiple_of,
    condition="text",
    caption_dim=m.caption_dim,
    cls_token_num=m.cls_token_num,
  )
  model.load_state_dict(torch.load(pt, weights_only=True)["model"], strict=True)
  params = checkpoints.load_params(full_run)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, m.vocab_size, size=(3, 16, 16)).astype(np.int32)
  valid = np.arange(T)[None, :] >= T - np.array([2, T, 5])[:, None]
  caption = rng.normal(size=(3, T, DIM)).astype(np.float32) * valid[..., None]
  null = np.array([False, True, False])
  logits = gpt.GPT(gpt.GPTConfig.from_config(m)).apply(
    {"params": params}, tokens, caption, caption_mask=valid, null_caption=null, patch_size=1
  )
  with torch.no_grad():
    want = model(
      torch.from_numpy(tokens.reshape(3, -1).astype(np.int64)),
      torch.from_numpy(caption),
      1,
      valid=torch.from_numpy(valid),
      drop=torch.from_numpy(null),
    ).numpy()
  assert rel_err(logits, want) <= 1e-4


@pytest.mark.timeout(700)
def test_two_processes_train_a_text_model_as_one_process_does(dataset, full_run, tmp_path):
  """The shared run's command on two processes of 4 CPU devices each, as test_multiprocess runs."""
  workdir = str(tmp_path / "two")
  cmd = _command(workdir, dataset) + [
    f"--coordinator_address=127.0.0.1:{free_port()}",
    "--num_processes=2",
  ]
  procs = []
  for i in range(2):
    log = f"{workdir}.{i}.log"
    with open(log, "w") as f:
      procs.append(
        (
          start_main(
            *cmd,
            f"--process_id={i}",
            env=multiprocess_env(2),
            stdout=f,
            stderr=subprocess.STDOUT,
          ),
          log,
        )
      )
  statuses = finish(procs, timeout=300)
  assert statuses == [0, 0], "\n".join(open(log).read()[-3000:] for _, log in procs)
  a, b = (jax.tree.map(np.asarray, checkpoints.load_params(w)) for w in (workdir, full_run))
  # As test_multiprocess: only the all-reduce differs (gloo vs. in-process), fp32 round-off.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=5e-6), a, b)
