"""Bad input through the real command lines: one `error:` line, a non-zero exit, nothing existing
changed.

Every case of CASES runs `python -m <module> <argv>` in a child process, as a user meets it, and
checks that it exits with status 2, that the last line on stderr is `error: ...` holding the case's
fragment, that no traceback was printed, and that every shared file (a trained workdir, a code data
set, weights, configs) and the case's own workdir are byte-identical afterwards (a workdir that did
not exist must still not exist).

docs/bad_inputs.md is generated from CASES (`python tests/test_bad_inputs.py > docs/bad_inputs.md`);
a test checks that it is current, so the table and the tests cannot drift.

The shared workdir is trained on 8 devices (tests/conftest.py) with its parameters split over them
(FSDP); the two tests at the end load it on 2 devices for sampling and init_from: crossing
topologies must work.
"""

import dataclasses
import hashlib
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
from support.cli import run_main
from support.paths import ROOT

EXIT_BAD_INPUT = 2


@dataclasses.dataclass(frozen=True)
class Case:
  id: str
  what: str  # The bad input, in words (docs/bad_inputs.md).
  argv: tuple[str, ...]  # `{name}` fields are paths of the shared fixture (see `shared`).
  fragment: str  # Must appear in the last stderr line, `error: ...`.
  module: str = "npp_jax.main"
  needs_mount: bool = False  # Skipped where this process cannot mount a tmpfs (not root).


TINY = ("--config=configs/tiny.py", "--workdir={work}", "--config.data.path={data}")
TRAIN = TINY + ("--config.train.max_steps=1",)
SAMPLE = (
  ("--mode=sample",)
  + TINY
  + (
    "--config.sample.checkpoint={trained}",
    "--config.sample.num_images=8",
    "--config.sample.batch_size=8",
  )
)
EXTRACT = (
  "--mode=extract",
  "--config=configs/demo.py:smoke",
  "--workdir={work}",
  "--config.extract.vq_checkpoint={vq_params}",
)
TRAIN_VQ = ("--mode=train_vq", "--config=configs/demo.py:smoke", "--workdir={work}")
EVALUATE = ("--mode=evaluate", "--config=configs/tiny.py", "--workdir={work}")
CONVERT = ("--kind=gpt", "--config=configs/tiny.py")
NPY = ("--from_npy={npy}", "--out={work}", "--vocab_size=256", "--num_classes=10")
DATA_CLI = "npp_jax.npy_codes"

CASES = [
  # --- config files and flags (main).
  Case(
    "config_missing",
    "--config names no file",
    ("--config={tmp}/nope.py", "--workdir={work}"),
    "no such file",
  ),
  Case(
    "config_directory",
    "--config names a directory",
    ("--config={cfg}", "--workdir={work}"),
    "is a directory",
  ),
  Case(
    "config_syntax",
    "a syntax error in the config file",
    ("--config={cfg}/syntax.py", "--workdir={work}"),
    "syntax.py, line 1: invalid syntax",
  ),
  Case(
    "config_raises",
    "the config file raises when imported",
    ("--config={cfg}/raises.py", "--workdir={work}"),
    "raises.py raised RuntimeError: boom (line 1)",
  ),
  Case(
    "config_no_get_config",
    "a config file without get_config",
    ("--config={cfg}/no_get_config.py", "--workdir={work}"),
    "defines no get_config()",
  ),
  Case(
    "config_get_config_raises",
    "get_config() raises",
    ("--config={cfg}/get_config_raises.py", "--workdir={work}"),
    "get_config() raised ZeroDivisionError: division by zero (line 2)",
  ),
  Case(
    "config_not_configdict",
    "get_config() returns no ConfigDict",
    ("--config={cfg}/returns_dict.py", "--workdir={work}"),
    "returned dict; expected an ml_collections.ConfigDict",
  ),
  Case(
    "config_bad_argument",
    "a config argument the file does not take",
    ("--config=configs/b.py:bogus", "--workdir={work}"),
    "get_config('bogus') raised ValueError",
  ),
  Case(
    "unknown_key",
    "a misspelled override key",
    TRAIN + ("--config.train.epochz=3",),
    "has no key 'train.epochz'; did you mean --config.train.epochs?",
  ),
  Case(
    "wrong_type_int",
    "a word for an integer field",
    TRAIN + ("--config.train.epochs=abc",),
    "--config.train.epochs='abc': invalid literal for int()",
  ),
  Case("unknown_flag", "a misspelled flag", TINY + ("--wrokdir=x",), "Did you mean: workdir"),
  Case("bad_mode", "an unknown --mode", TINY + ("--mode=evaluat",), "flag --mode=evaluat"),
  Case(
    "no_workdir",
    "--workdir left out",
    ("--config=configs/tiny.py",),
    "Flag --workdir must have a value",
  ),
  Case(
    "coordinator_alone",
    "a coordinator address without a process count or id",
    TRAIN + ("--coordinator_address=localhost:1234",),
    "also needs --num_processes",
  ),
  # --- the workdir.
  Case(
    "workdir_is_file",
    "--workdir is a file",
    TRAIN[:1] + ("--workdir={file}",) + TRAIN[2:],
    "is a file; expected a directory",
  ),
  Case(
    "workdir_read_only",
    "--workdir on a read-only file system",
    TRAIN[:1] + ("--workdir={ro}/run",) + TRAIN[2:],
    "is not writable",
    needs_mount=True,
  ),
  Case(
    "sample_workdir_is_file",
    "sampling into a --workdir that is a file",
    SAMPLE[:2] + ("--workdir={file}",) + SAMPLE[3:],
    "is a file; expected a directory",
  ),
  # --- train: every field it reads.
  Case(
    "n_layer_negative",
    "a negative model.n_layer",
    TRAIN + ("--config.model.n_layer=-1",),
    "model.n_layer=-1; expected a positive integer",
  ),
  Case(
    "n_head_not_dividing",
    "model.dim not divisible by model.n_head",
    TRAIN + ("--config.model.n_head=3",),
    "n_head=3",
  ),
  Case(
    "model_name_unknown",
    "an unknown model.name",
    TRAIN + ("--config.model.name=GPT-Z",),
    "unknown model.name='GPT-Z'",
  ),
  Case(
    "log_every_zero",
    "train.log_every_steps=0",
    TRAIN + ("--config.train.log_every_steps=0",),
    "train.log_every_steps=0; expected a positive integer",
  ),
  Case(
    "keep_checkpoints_zero_existing",
    "keep_checkpoints=0 on a workdir with checkpoints",
    (
      "--config=configs/tiny.py",
      "--workdir={trained}",
      "--config.data.path={data}",
      "--config.mesh.shape=(1,8,1)",
      "--config.train.keep_checkpoints=0",
    ),
    "train.keep_checkpoints=0; expected a positive integer (checkpoints to keep): it would delete "
    "the 1 "
    "checkpoints (steps [2])",
  ),
  Case(
    "batch_not_splitting",
    "a batch that does not split over 8 devices",
    TRAIN + ("--config.train.global_batch_size=12",),
    "does not split over the data-parallel size 8",
  ),
  Case(
    "mesh_shape_word", "a word for mesh.shape", TRAIN + ("--config.mesh.shape=abc",), "mesh.shape"
  ),
  Case(
    "data_missing",
    "data.path names no data set",
    TRAIN[:2] + ("--config.data.path={tmp}/nope", "--config.train.max_steps=1"),
    "no code data set at",
  ),
  Case(
    "init_from_vq",
    "init_from names a VQ params directory",
    TRAIN + ("--config.train.init_from={vq_params}",),
    "is a VQ params directory; expected",
  ),
  Case(
    "init_from_text",
    "init_from names a text file",
    TRAIN + ("--config.train.init_from={pt_text}",),
    "is a text file; expected",
  ),
  # --- sample.
  Case(
    "sample_no_checkpoint",
    "sampling without sample.checkpoint",
    SAMPLE + ("--config.sample.checkpoint=",),
    "sample.checkpoint is empty",
  ),
  Case(
    "sample_vq_params",
    "sampling from a VQ params directory",
    SAMPLE + ("--config.sample.checkpoint={vq_params}",),
    "is a VQ params directory; expected",
  ),
  Case(
    "sample_data_set",
    "sampling from a code data set",
    SAMPLE + ("--config.sample.checkpoint={data}",),
    "is a code data set; expected",
  ),
  Case(
    "sample_torch_file",
    "sampling from a PyTorch file",
    SAMPLE + ("--config.sample.checkpoint={pt_good}",),
    "is a PyTorch file (convert it first",
  ),
  Case(
    "sample_other_model",
    "sampling a checkpoint with another model config",
    SAMPLE + ("--config.model.n_layer=3",),
    "does not fit model.name='custom'",
  ),
  Case(
    "sample_vq_is_gpt",
    "sampling with a GPT training workdir as the VQ",
    SAMPLE + ("--config.sample.vq_checkpoint={trained}",),
    "is a GPT training workdir; expected a VQ params",
  ),
  # --- evaluate.
  Case(
    "evaluate_no_samples",
    "evaluating without evaluate.samples",
    EVALUATE,
    "evaluate.samples is empty",
  ),
  Case(
    "evaluate_samples_not_npz",
    "evaluate.samples is a text file",
    EVALUATE
    + (
      "--config.evaluate.samples={pt_text}",
      "--config.evaluate.reference=digits",
      "--config.evaluate.inception={pt_good}",
    ),
    "is not a readable .npz",
  ),
  Case(
    "evaluate_batch_not_splitting",
    "an evaluation batch that does not split over 8 devices",
    EVALUATE + ("--config.evaluate.samples={pt_text}", "--config.evaluate.batch_size=12"),
    "evaluate.batch_size=12 does not split over the data-parallel size 8",
  ),
  # --- extract, train_vq, demo.
  Case(
    "extract_gpt_workdir",
    "extracting with a GPT training workdir as the VQ",
    EXTRACT + ("--config.extract.vq_checkpoint={trained}",),
    "is a GPT training workdir; expected",
  ),
  Case(
    "extract_no_vq",
    "extracting without extract.vq_checkpoint",
    EXTRACT + ("--config.extract.vq_checkpoint=",),
    "extract.vq_checkpoint is empty",
  ),
  Case(
    "train_vq_keep_zero",
    "vq_train.keep_checkpoints=0",
    TRAIN_VQ + ("--config.vq_train.keep_checkpoints=0",),
    "vq_train.keep_checkpoints=0; expected a positive integer",
  ),
  Case(
    "demo_without_demo_section",
    "--mode=demo with a config that has no demo section",
    ("--mode=demo",) + TINY,
    "the config has no `demo` section",
  ),
  # --- convert.
  Case(
    "convert_text_pt",
    "a .pt that is text",
    CONVERT + ("--src={pt_text}", "--dst={work}"),
    "is a text file, not a PyTorch checkpoint",
    module="npp_jax.convert",
  ),
  Case(
    "convert_truncated_pt",
    "a truncated .pt",
    CONVERT + ("--src={pt_truncated}", "--dst={work}"),
    "truncated",
    module="npp_jax.convert",
  ),
  Case(
    "convert_pickle_with_code",
    "a .pt whose pickle runs code",
    CONVERT + ("--src={pt_evil}", "--dst={work}"),
    "refused",
    module="npp_jax.convert",
  ),
  Case(
    "convert_to_torch_vq_of_workdir",
    "--to=torch --kind=vq from a GPT training workdir",
    ("--kind=vq", "--config=configs/tiny.py", "--to=torch", "--src={trained}", "--dst={work}.pt"),
    "is a GPT training workdir; expected a VQ params directory",
    module="npp_jax.convert",
  ),
  Case(
    "convert_step_not_kept",
    "--step that the training workdir did not keep",
    CONVERT + ("--to=torch", "--src={trained}", "--step=1", "--dst={work}.pt"),
    "holds no checkpoint of step 1; expected one of [2]",
    module="npp_jax.convert",
  ),
  Case(
    "convert_ema_of_a_run_without",
    "--ema from a training workdir that kept no EMA",
    CONVERT + ("--to=params", "--src={trained}", "--ema", "--dst={work}"),
    "has no EMA weights",
    module="npp_jax.convert",
  ),
  Case(
    "convert_params_to_params",
    "--to=params from a params directory",
    ("--kind=vq", "--config=configs/tiny.py", "--to=params", "--src={vq_params}", "--dst={work}"),
    "is a VQ params directory; expected a VQ training workdir",
    module="npp_jax.convert",
  ),
  Case(
    "convert_to_torch_vq",
    "--to=torch --kind=gpt from a VQ params directory",
    CONVERT + ("--to=torch", "--src={vq_params}", "--dst={work}.pt"),
    "is a VQ params directory; expected",
    module="npp_jax.convert",
  ),
  Case(
    "convert_dst_exists",
    "--dst exists",
    CONVERT + ("--src={pt_text}", "--dst={data}"),
    "already exists",
    module="npp_jax.convert",
  ),
  Case(
    "convert_unknown_key",
    "a misspelled override key in convert",
    CONVERT + ("--config.model.n_layr=3", "--src={pt_text}", "--dst={work}"),
    "did you mean --config.model.n_layer?",
    module="npp_jax.convert",
  ),
  # --- the .npy converter (python -m npp_jax.npy_codes).
  Case(
    "npy_grid_malformed",
    "a malformed --grid",
    NPY + ("--grid=4,x",),
    "--grid=4,x; expected two integers",
    module=DATA_CLI,
  ),
  Case(
    "npy_vocab_word",
    "a word for --vocab_size",
    NPY[:2] + ("--vocab_size=many", "--num_classes=10"),
    "flag --vocab_size=many",
    module=DATA_CLI,
  ),
  Case(
    "npy_missing_flag",
    "--out left out",
    (NPY[0], NPY[2], NPY[3]),
    "Flag --out must have a value",
    module=DATA_CLI,
  ),
  Case(
    "npy_not_a_folder",
    "--from_npy names no folder",
    ("--from_npy={tmp}/nope",) + NPY[1:],
    "is not a directory",
    module=DATA_CLI,
  ),
  Case(
    "npy_extra_argument",
    "a stray positional argument",
    NPY + ("extra",),
    "unexpected argument 'extra'",
    module=DATA_CLI,
  ),
]

# Every other field of every mode, in process (milliseconds each): the job's check (npp_jax.jobs) is
# what main runs first, and the CLI cases above show that its ValueError reaches the user as the
# `error:` line.
FIELD_CASES = [
  ("train", {"model.n_layer": 0}, "model.n_layer=0; expected a positive integer"),
  ("train", {"model.n_kv_head": 3}, "model.n_kv_head=3 does not divide n_head=2"),
  ("train", {"model.resid_dropout": 1.5}, "model.resid_dropout=1.5; expected a number in [0, 1)"),
  ("train", {"model.dtype": "float8"}, "model.dtype='float8'; expected one of"),
  ("train", {"model.remat": "some"}, "model.remat='some'; expected one of"),
  ("train", {"model.grid": (16, 0)}, "model.grid=(16, 0)"),
  (
    "train",
    {"train.checkpoint_every_steps": 0},
    "train.checkpoint_every_steps=0; expected a positive integer",
  ),
  (
    "train",
    {"train.keep_checkpoints": -1},
    "train.keep_checkpoints=-1; expected a positive integer",
  ),
  (
    "train",
    {"train.global_batch_size": 0},
    "train.global_batch_size=0; expected a positive integer",
  ),
  ("train", {"train.grad_accum_steps": 0}, "train.grad_accum_steps=0; expected a positive integer"),
  (
    "train",
    {"train.grad_accum_steps": 3},
    "train.global_batch_size=16 with 3 micro-batches does not split",
  ),
  (
    "train",
    {"train.max_steps": 0},
    "train.max_steps=0; expected -1 (the whole schedule) or a positive",
  ),
  ("train", {"train.epochs": 0}, "train.epochs=0; expected a positive number"),
  ("train", {"train.preemption_sync_every_steps": 0}, "train.preemption_sync_every_steps=0"),
  ("train", {"train.eval_batches": -1}, "train.eval_batches=-1; expected an integer >= 0"),
  ("train", {"data.eval_split": "test[:10]"}, "data.eval_split='test[:10]'"),
  ("train", {"data.worker_count": -1}, "data.worker_count=-1; expected an integer >= 0"),
  ("train", {"data.path": ""}, "data.path is empty"),
  ("train", {"optim.lr": -1.0}, "optim.lr=-1.0; expected a positive number"),
  ("train", {"optim.end_lr": 1.0}, "optim.end_lr=1.0; expected a number in [0, optim.lr=0.003]"),
  ("train", {"optim.ema_decay": 1.0}, "optim.ema_decay=1.0; expected a number in [0, 1)"),
  ("train", {"optim.b2": 1.0}, "optim.b2=1.0; expected a number in [0, 1)"),
  ("train", {"npp.epoch_rate": 1.5}, "npp.epoch_rate=1.5; expected a number in (0, 1)"),
  ("train", {"npp.patch_level": 5}, "npp.patch_level=5; expected one of [1, 2, 3, 4]"),
  ("train", {"mesh.shape": (3, 1, 1)}, "mesh.shape=(3, 1, 1) needs 3 devices"),
  ("train", {"mesh.shape": (-1, 3, 1)}, "cannot be filled from 8 devices"),
  ("sample", {"sample.num_images": 0}, "sample.num_images=0; expected a positive integer"),
  ("sample", {"sample.top_p": 2.0}, "sample.top_p=2.0; expected a number in (0, 1]"),
  (
    "sample",
    {"sample.top_k": 300},
    "sample.top_k=300; expected an integer in [0, model.vocab_size=256]",
  ),
  ("sample", {"sample.temperature": 0.0}, "sample.temperature=0.0; expected a positive number"),
  ("sample", {"sample.cfg_scale": 0.5}, "sample.cfg_scale=0.5; expected a number >= 1"),
  ("sample", {"sample.cfg_interval": -2}, "sample.cfg_interval=-2"),
  ("sample", {"sample.classes": (3, 11)}, "sample.classes holds 11"),
  (
    "sample",
    {"sample.batch_size": 12},
    "sample.batch_size=12 over 8 devices; expected a multiple of 8",
  ),
  ("sample", {"sample.dtype": "int8"}, "sample.dtype='int8'"),
  ("sample", {"sample.grid_rows": 0}, "sample.grid_rows=0; expected a positive integer"),
  ("evaluate", {"evaluate.preprocess": "bogus"}, "evaluate.preprocess='bogus'"),
  ("evaluate", {"evaluate.resize_to": 10}, "evaluate.resize_to=10"),
  ("evaluate", {"evaluate.fid_method": "svd"}, "evaluate.fid_method='svd'"),
  ("evaluate", {"evaluate.neighbours": 0}, "evaluate.neighbours=0; expected a positive integer"),
  ("extract", {"extract.aug": "rotate"}, "extract.aug='rotate'; expected one of"),
  ("extract", {"extract.crop_range": 0.5}, "extract.crop_range=0.5; expected a number >= 1"),
  (
    "extract",
    {"extract.crop_range": 3.0},
    "extract.crop_range=3.0; expected a number >= 1 and at most 2",
  ),
  ("extract", {"extract.split": "train[:10]"}, "extract.split='train[:10]'"),
  ("extract", {"extract.batch_size": 0}, "extract.batch_size=0; expected a positive integer"),
  ("train_vq", {"vq_train.steps": 0}, "vq_train.steps=0; expected a positive integer"),
  ("train_vq", {"vq_train.lr": 0.0}, "vq_train.lr=0.0; expected a positive number"),
  ("train_vq", {"vq_train.l1_weight": 0.0, "vq_train.l2_weight": 0.0}, "are both 0"),
  (
    "train_vq",
    {"vq.image_size": 30},
    "vq.image_size=30; expected a multiple of the downsampling factor",
  ),
  ("demo", {"demo.classifier_epochs": 0}, "demo.classifier_epochs=0; expected a positive integer"),
  ("demo", {"train.log_every_steps": 0}, "train.log_every_steps=0; expected a positive integer"),
  ("compile", {"compile.headroom": 1.5}, "compile.headroom=1.5; expected a number in [0, 1)"),
]
_FIELD_CONFIGS = {
  "train": "configs/tiny.py",
  "sample": "configs/tiny.py",
  "evaluate": "configs/tiny.py",
  "extract": "configs/demo.py:smoke",
  "train_vq": "configs/demo.py:smoke",
  "demo": "configs/demo.py:smoke",
  "compile": "configs/tiny.py",
}


# ------------------------------------------------------------------------------------------ fixture


def _run(module, argv, env=None, timeout=300):
  return run_main(*argv, module=module, env=env, timeout=timeout)


def _make_codes(n=64, vocab=256, classes=10):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, classes, size=n)
  codes = rng.integers(0, vocab, size=(n, 1, 16, 16))
  return codes.astype(np.int32), labels.astype(np.int32)


def _write_configs(folder):
  os.makedirs(folder)
  files = {
    "syntax.py": "def get_config(:\n",
    "raises.py": "raise RuntimeError('boom')\n",
    "no_get_config.py": "X = 1\n",
    "get_config_raises.py": "def get_config(arg=None):\n  return 1 / 0\n",
    "returns_dict.py": "def get_config(arg=None):\n  return {'model': {}}\n",
  }
  for name, text in files.items():
    with open(os.path.join(folder, name), "w") as f:
      f.write(text)


def _write_torch_files(folder, marker):
  import torch

  with open(os.path.join(folder, "text.pt"), "w") as f:
    f.write("this is not a checkpoint\n")
  good = os.path.join(folder, "good.pt")
  torch.save({"model": {"tok_embeddings.weight": torch.ones(4, 4)}}, good)
  blob = open(good, "rb").read()
  with open(os.path.join(folder, "truncated.pt"), "wb") as f:
    f.write(blob[: len(blob) // 2])

  class Evil:  # A pickle that runs a shell command when loaded without weights_only.
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  with open(os.path.join(folder, "evil.pt"), "wb") as f:
    pickle.dump({"model": Evil()}, f)


def _write_vq_params(path):
  """A VQ params directory of the demo's architecture (random weights: only its kind matters
  here)."""
  from npp_jax import checkpoints
  from npp_jax import config_lib
  from npp_jax.models import vq

  rng = np.random.default_rng(1)
  flat = {
    k: rng.standard_normal(s).astype(np.float32)
    for k, s in vq.param_shapes(config_lib.load("configs/demo.py:smoke").vq).items()
  }
  tree = {}
  for key, x in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = x
  checkpoints.save_params(path, tree)


def _write_npy_folder(path):
  codes, labels = _make_codes(4)
  for sub in ("imagenet256_codes", "imagenet256_labels"):
    os.makedirs(os.path.join(path, sub))
  for i in range(4):
    np.save(os.path.join(path, "imagenet256_codes", f"{i}.npy"), codes[i])
    np.save(os.path.join(path, "imagenet256_labels", f"{i}.npy"), labels[i : i + 1])


def _can_mount(path, options):
  os.makedirs(path, exist_ok=True)
  out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path], capture_output=True)
  return out.returncode == 0


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """The files every case may touch: made once, checked unchanged after every case."""
  from npp_jax.data import code_dataset

  base = tmp_path_factory.mktemp("bad_inputs")
  p = {
    "tmp": str(base),
    "cfg": str(base / "cfg"),
    "data": str(base / "codes"),
    "file": str(base / "a_file"),
    "trained": str(base / "trained"),
    "vq_params": str(base / "vq_params"),
    "npy": str(base / "npy"),
    "marker": str(base / "evil_ran"),
    "ro": str(base / "ro"),
  }
  _write_configs(p["cfg"])
  codes, labels = _make_codes()
  code_dataset.write_code_dataset(p["data"], codes, labels, vocab_size=256, num_classes=10)
  with open(p["file"], "w") as f:
    f.write("a file, not a directory\n")
  _write_torch_files(str(base), p["marker"])
  p.update(
    pt_text=str(base / "text.pt"),
    pt_truncated=str(base / "truncated.pt"),
    pt_evil=str(base / "evil.pt"),
    pt_good=str(base / "good.pt"),
  )
  _write_vq_params(p["vq_params"])
  _write_npy_folder(p["npy"])
  # A run trained on 8 devices with its parameters split over them (FSDP): 2 steps, one checkpoint.
  out = _run(
    "npp_jax.main",
    [
      "--config=configs/tiny.py",
      f"--workdir={p['trained']}",
      f"--config.data.path={p['data']}",
      "--config.mesh.shape=(1,8,1)",
      "--config.train.max_steps=2",
      "--config.train.checkpoint_every_steps=2",
    ],
  )
  assert out.returncode == 0, out.stderr[-3000:]
  p["mounted"] = _can_mount(p["ro"], "ro,size=1M")
  yield p
  if p["mounted"]:
    subprocess.run(["umount", p["ro"]], check=False)


def _snapshot(*roots):
  """{path: sha256} of every file under roots (None for a root that does not exist)."""
  out = {}
  for root in roots:
    if not os.path.exists(root):
      out[root] = None
    elif os.path.isfile(root):
      out[root] = hashlib.sha256(open(root, "rb").read()).hexdigest()
    else:
      for folder, _, files in os.walk(root):
        for name in files:
          path = os.path.join(folder, name)
          out[path] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


_WATCHED = (
  "cfg",
  "data",
  "file",
  "trained",
  "vq_params",
  "npy",
  "pt_text",
  "pt_truncated",
  "pt_evil",
  "pt_good",
)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_bad_input_is_one_line_and_changes_nothing(shared, tmp_path, case):
  if case.needs_mount and not shared["mounted"]:
    pytest.skip(
      "cannot mount a read-only tmpfs here (needs root); chmod does not stop root from writing"
    )
  fields = dict(shared, work=str(tmp_path / "run"))
  argv = [a.format(**fields) for a in case.argv]
  roots = [shared[k] for k in _WATCHED] + [fields["work"], fields["work"] + ".pt"]
  before = _snapshot(*roots)
  out = _run(case.module, argv)
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert out.returncode == EXIT_BAD_INPUT, (out.returncode, out.stderr[-3000:])
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert lines and lines[-1].startswith("error: "), out.stderr[-3000:]
  assert case.fragment in lines[-1], lines[-1]
  assert _snapshot(*roots) == before
  assert not os.path.exists(shared["marker"]), "the pickle's code ran"


@pytest.mark.parametrize(
  "mode, overrides, fragment", FIELD_CASES, ids=[f"{m}-{'-'.join(o)}" for m, o, _ in FIELD_CASES]
)
def test_preflight_refuses_each_field(shared, tmp_path, mode, overrides, fragment):
  from npp_jax import config_lib
  from npp_jax import jobs

  config = config_lib.load(_FIELD_CONFIGS[mode])
  # Healthy inputs everywhere else, so that the field under test is the first thing refused.
  config.update_from_flattened_dict(
    {
      "data.path": shared["data"],
      "sample.checkpoint": shared["trained"],
      "extract.vq_checkpoint": shared["vq_params"],
      "evaluate.samples": shared["pt_text"],
      **overrides,
    }
  )
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as error:
    jobs.get(mode).check(config, str(workdir), jobs.Topology(num_devices=8, process_count=1))
  assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)
  assert not workdir.exists()


# ----------------------------------------------------------------------------- loads that must work

TWO_DEVICES = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")


def test_sampling_reads_a_checkpoint_of_another_topology(shared, tmp_path):
  out = _run(
    "npp_jax.main", [a.format(**shared, work=str(tmp_path / "s")) for a in SAMPLE], env=TWO_DEVICES
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert any(
    name.endswith(".npz") or name.endswith(".npy")
    for _, _, names in os.walk(tmp_path / "s")
    for name in names
  ), os.listdir(tmp_path / "s")


def test_init_from_reads_a_checkpoint_of_another_topology(shared, tmp_path):
  out = _run(
    "npp_jax.main",
    [a.format(**shared, work=str(tmp_path / "t")) for a in TRAIN]
    + [f"--config.train.init_from={shared['trained']}"],
    env=TWO_DEVICES,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Initialised parameters from" in out.stderr


def test_a_full_disk_stops_the_run_at_that_save(shared, tmp_path):
  """ENOSPC for real: WORKDIR/checkpoints is a tmpfs with room for one checkpoint and a half, so the
  second save fails in orbax's background thread; the run must stop with one line naming the cause
  and the last good step, and that checkpoint must still load."""
  work, size = (
    tmp_path / "full",
    sum(
      os.path.getsize(os.path.join(d, f))
      for d, _, names in os.walk(os.path.join(shared["trained"], "checkpoints"))
      for f in names
    ),
  )
  folder = str(work / "checkpoints")
  if not _can_mount(folder, f"size={size * 3 // 2 // 1024}k"):
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    out = _run(
      "npp_jax.main",
      [a.format(**shared, work=str(work)) for a in TINY]
      + [
        "--config.train.max_steps=4",
        "--config.train.checkpoint_every_steps=1",
        "--config.train.keep_checkpoints=1",
      ],
    )
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == EXIT_BAD_INPUT, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    said = re.fullmatch(
      rf"error: saving checkpoint step (\d+) in {re.escape(folder)} failed: No space left on "
      r"device \(\w+\); the run stopped there; the last good checkpoint is step (\d+) \(left "
      r"intact\)",
      lines[-1],
    )
    assert said and int(said[2]) == int(said[1]) - 1 >= 1, lines[-1]
    import jax

    from npp_jax import checkpoints

    assert checkpoints.Checkpointer(folder, keep=1).latest_step() == int(said[2])
    params = checkpoints.load_params(str(work))  # The last good step, whole.
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  finally:
    subprocess.run(["umount", folder], check=False)


# ------------------------------------------------------------------------------------------ the doc


def doc() -> str:
  """docs/bad_inputs.md, generated from CASES."""
  lines = [
    "# Bad inputs and their messages",
    "",
    "Every row is a case of `tests/test_bad_inputs.py`, run through the real command line: the "
    "command exits",
    f"with status {EXIT_BAD_INPUT}, its last stderr line is `error: ...` containing the fragment "
    "shown, no",
    "traceback is printed, and no existing file changes (trained checkpoints, data sets, weights, "
    "the",
    "workdir). Generated by `python tests/test_bad_inputs.py > docs/bad_inputs.md`; a test keeps "
    "it current.",
    "Placeholders: `{work}` a fresh workdir, `{trained}` a workdir trained on 8 devices, `{data}` "
    "a code data",
    "set, `{vq_params}` a VQ params directory, `{file}` a plain file, `{ro}` a read-only mount, "
    "`{cfg}` a",
    "folder of broken config files, `{pt_*}` bad PyTorch files, `{npy}` a LlamaGen .npy folder.",
    "",
    "| case | bad input | command | message contains |",
    "|---|---|---|---|",
  ]
  for c in CASES:
    cmd = f"python -m {c.module} " + " ".join(c.argv)
    lines.append(f"| {c.id} | {c.what} | `{cmd}` | `{c.fragment}` |")
  lines += [
    "",
    "## Every other field",
    "",
    "Each job (`npp_jax/jobs/`) checks every config field it reads before anything starts, through "
    "the",
    "settings class of each config section; these rows run `jobs.get(mode).check(config, workdir, "
    "topology)`",
    "on the mode's config (`configs/tiny.py`, or `configs/demo.py:smoke` for extract, train_vq and "
    "demo) with",
    "the one change shown, through the same `error:` line on the command line (e.g. "
    "`--config.optim.lr=-1.0`).",
    "",
    "| mode | change | message contains |",
    "|---|---|---|",
  ]
  for mode, overrides, fragment in FIELD_CASES:
    change = ", ".join(f"{k}={v!r}" for k, v in overrides.items())
    lines.append(f"| {mode} | `{change}` | `{fragment}` |")
  return "\n".join(lines) + "\n"


def test_doc_is_generated_from_the_cases():
  with open(os.path.join(ROOT, "docs", "bad_inputs.md")) as f:
    assert f.read() == doc(), "regenerate: python tests/test_bad_inputs.py > docs/bad_inputs.md"


def test_enough_cases_across_modes():
  from npp_jax import jobs

  assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)
  assert {mode for mode, _, _ in FIELD_CASES} == set(jobs.MODES)  # The registry's every mode.
  assert {c.module for c in CASES} == {"npp_jax.main", "npp_jax.convert", DATA_CLI}
  modes = {
    next((a.split("=")[1] for a in c.argv if a.startswith("--mode=")), "train")
    for c in CASES
    if c.module == "npp_jax.main"
  }
  assert {"train", "sample", "extract", "train_vq", "demo", "evaluate"} <= modes


if __name__ == "__main__":
  sys.stdout.write(doc())
