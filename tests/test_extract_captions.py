"""`--mode=extract` with extract.captions through the real command line: a tiny image + caption
index (a broken image among them) and a T5 folder built here -> a caption code data set equal to
the caption_codes library's; a run that lost a shard and its data set resumes to the identical data
set; bad inputs end in one `error:` line with nothing written."""

import json
import shutil

import jax
import ml_dtypes
import numpy as np
from PIL import Image
import pytest
from support import t5_files
from support.cli import free_port
from support.cli import multiprocess_env
from support.cli import run_main
from support.cli import start_main
from support.configs import tiny_vq_config
from support.paths import TESTS

from npp_jax import caption_codes
from npp_jax import checkpoints
from npp_jax import sharding
from npp_jax import text_encoder
from npp_jax.data import caption_index
from npp_jax.data import captions
from npp_jax.data import code_dataset
from npp_jax.jobs import extract
from npp_jax.models import vq

LINES = 6  # Three shards of 2; line 3's image is not an image.


def _random(path, s, rng) -> np.ndarray:
  """Norm scales near 1, kernels at unit gain, everything else small: codes that vary."""
  name = jax.tree_util.keystr(path)
  if "scale" in name:
    x = 1.0 + 0.2 * rng.standard_normal(s.shape)
  elif len(s.shape) > 1:
    x = rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
  else:
    x = 0.1 * rng.standard_normal(s.shape)
  return x.astype(s.dtype)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """(tmp, VQ checkpoint, T5 folder, index, config file) shared by the tests."""
  tmp = tmp_path_factory.mktemp("captions")
  rng = np.random.default_rng(0)
  c = tiny_vq_config()
  cfg = vq.VQConfig.from_config(c.vq)
  # Random weights of the real architecture, drawn in NumPy from the shapes: no init to compile.
  shapes = jax.eval_shape(lambda k: vq.init_params(cfg, k), jax.random.key(1))
  params = jax.tree_util.tree_map_with_path(lambda p, s: _random(p, s, rng), shapes)
  checkpoints.save_params(str(tmp / "vq"), params)
  t5 = t5_files.write_folder(tmp / "t5", t5_files.random_encoder(), t5_files.train_spiece())
  lines = []
  for i in range(LINES):
    path = tmp / "img" / f"{i}.png"
    path.parent.mkdir(exist_ok=True)
    if i == 3:
      path.write_bytes(b"not an image")
    else:
      Image.fromarray(rng.integers(0, 256, (36, 40 + i, 3), dtype=np.uint8)).save(path)
    text = [f"a photo of a cat on a table, number {i}", f"two dogs {i}"]
    lines.append(json.dumps({"image_path": str(path), "text": text}))
  (tmp / "index.jsonl").write_text("\n".join(lines) + "\n")
  config_file = tmp / "tiny.py"
  config_file.write_text(
    f"import sys\nsys.path.insert(0, {TESTS!r})\nfrom support.configs import tiny_vq_config\n\n\n"
    "def get_config():\n  c = tiny_vq_config()\n"
    "  c.model.condition, c.model.caption_dim = 'text', 32\n  return c\n"
  )
  return tmp, tmp / "vq", t5, tmp / "index.jsonl", config_file


def cli(workdir, inputs, *flags):
  return run_main(*cli_argv(workdir, inputs, *flags))


def cli_argv(workdir, inputs, *flags) -> list[str]:
  tmp, vq_dir, t5, index, config_file = inputs
  return [
    "--mode=extract",
    f"--config={config_file}",
    f"--workdir={workdir}",
    f"--config.extract.vq_checkpoint={vq_dir}",
    f"--config.extract.captions={index}",
    f"--config.extract.text_encoder={t5}",
    "--config.extract.aug=none",
    "--config.extract.batch_size=2",
    "--config.extract.split=train",
    "--config.extract.text_dtype=float32",
    *flags,
  ]


def records(path):
  """Every example of the split as stored: codes, caption (bf16), text, valid."""
  _, source = code_dataset.open_split(str(path), "train", captions.load_metadata)
  return source.__getitems__(list(range(len(source))))


def assert_same(got, want):
  assert len(got) == len(want)
  for a, b in zip(got, want):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.fixture(scope="module")
def first_run(inputs):
  """The command line once, keeping its shards."""
  workdir = inputs[0] / "w"
  run = cli(workdir, inputs, "--config.extract.keep_shards=True")
  assert run.returncode == 0, run.stderr[-3000:]
  return workdir, run


def test_extract_captions_from_the_cli_equals_the_library(inputs, first_run):
  tmp, vq_dir, t5, index, _ = inputs
  workdir, run = first_run
  assert "1 images unreadable" in run.stdout and "0 captions cut" in run.stdout
  meta = captions.load_metadata(str(workdir / "codes"))
  assert (meta.num_examples, meta.num_valid, meta.caption_dim, meta.n_aug) == (LINES, 5, 32, 1)
  # The library on this process's 8 devices, all lines in one batch.
  c = tiny_vq_config()
  cfg = vq.VQConfig.from_config(c.vq)
  mesh = sharding.make_mesh(c.mesh)
  params = checkpoints.load_vq_params(str(vq_dir), c.vq)
  encoder = text_encoder.TextEncoder(
    t5, mesh, sharding.axis_rules(c.mesh), dtype="float32", param_dtype="float32"
  )
  with captions.CaptionDatasetWriter(tmp / "lib", cfg.grid, 1, cfg.codebook_size, 32) as writer:
    counts = caption_codes.extract_captions(
      caption_index.read_index(index),
      writer,
      batch_size=LINES,
      encode_views=lambda v: extract.encode_views(params, v, cfg, mesh),
      encoder=encoder,
      views=caption_codes.Views(aug="none", image_size=cfg.image_size),
    )
  assert counts == {"examples": LINES, "skipped": 1, "truncated": 0}
  got, want = records(workdir / "codes"), records(tmp / "lib")
  assert len(np.unique(np.stack([r["codes"] for r in want]))) > 8  # Random weights: codes vary.
  for a, b in zip(got, want):
    assert (a["text"], a["valid"]) == (b["text"], b["valid"])
    np.testing.assert_array_equal(a["codes"], b["codes"])
    assert a["caption"].dtype == ml_dtypes.bfloat16 and a["caption"].shape == b["caption"].shape
    np.testing.assert_allclose(  # Another batch split over the devices: within one bf16 step.
      a["caption"].astype(np.float32), b["caption"].astype(np.float32), rtol=1e-2, atol=1e-2
    )
  assert not got[3]["valid"] and got[3]["text"] == b"a photo of a cat on a table, number 3"


def test_extract_captions_resumes_after_a_lost_shard(inputs, first_run):
  workdir, _ = first_run
  want = records(workdir / "codes")
  tmp_dir = workdir / "extract_tmp" / "train"
  kept = {p.name: p.stat().st_mtime_ns for p in tmp_dir.glob("shard_*.npz")}
  assert len(kept) == 3
  # As a run killed while encoding shard 1: the data set not written yet, shard 1 missing.
  (tmp_dir / "shard_000001.npz").unlink()
  shutil.rmtree(workdir / "codes")
  run = cli(workdir, inputs, "--config.extract.keep_shards=True")
  assert run.returncode == 0, run.stderr[-3000:]
  assert "1 images unreadable" in run.stdout
  assert_same(records(workdir / "codes"), want)
  # Shard 1 encoded again; shards 0 and 2 reused as they were.
  now = {p.name: p.stat().st_mtime_ns for p in tmp_dir.glob("shard_*.npz")}
  assert now.keys() == kept.keys() and now["shard_000001.npz"] != kept["shard_000001.npz"]
  assert [now[k] for k in ("shard_000000.npz", "shard_000002.npz")] == [
    kept[k] for k in ("shard_000000.npz", "shard_000002.npz")
  ]


@pytest.mark.parametrize(
  "case",
  ["missing_index", "bad_line", "no_spiece", "caption_dim", "no_text_encoder"],
)
def test_extract_captions_bad_input_is_one_line_and_writes_nothing(inputs, case):
  tmp, _, t5, index, _ = inputs
  bad = tmp / f"bad_{case}"
  bad.mkdir(exist_ok=True)
  flags, fragment = {
    "missing_index": (
      [f"--config.extract.captions={bad / 'nope.jsonl'}"],
      "nope.jsonl does not exist; expected a .jsonl file",
    ),
    "bad_line": ([f"--config.extract.captions={bad / 'index.jsonl'}"], "index.jsonl:2 is not"),
    "no_spiece": ([f"--config.extract.text_encoder={bad}"], "has no spiece.model"),
    "caption_dim": (["--config.model.caption_dim=64"], "model.caption_dim=64"),
    "no_text_encoder": (["--config.extract.text_encoder="], "extract.text_encoder is empty"),
  }[case]
  if case == "bad_line":
    good = index.read_text().splitlines()
    (bad / "index.jsonl").write_text(good[0] + "\n{not json\n")
  if case == "no_spiece":
    for name in ("config.json", "model.safetensors"):
      (bad / name).write_bytes((t5 / name).read_bytes())
  workdir = tmp / f"w_{case}"
  run = cli(workdir, inputs, *flags)
  assert run.returncode == 2, run.stderr[-3000:]
  last = run.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and fragment in last, last
  assert "Traceback" not in run.stderr
  assert not workdir.exists()


@pytest.mark.timeout(400)
def test_two_processes_extract_the_one_process_caption_data_set(inputs, first_run):
  """2 real processes x 4 CPU devices (gloo on loopback), one line of each shard per process."""
  workdir = inputs[0] / "two"
  address = f"--coordinator_address=127.0.0.1:{free_port()}"
  procs, logs = [], []
  for i in range(2):
    logs.append(inputs[0] / f"process_{i}.log")
    with open(logs[-1], "w") as f:
      argv = cli_argv(workdir, inputs, address, "--num_processes=2", f"--process_id={i}")
      procs.append(start_main(*argv, env=multiprocess_env(2), stdout=f, stderr=f))
  try:
    statuses = [p.wait(timeout=300) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  assert statuses == [0, 0], "\n".join(log.read_text()[-3000:] for log in logs)
  assert "1 images unreadable" in logs[0].read_text()
  assert_same(records(workdir / "codes"), records(first_run[0] / "codes"))
  assert not (workdir / "extract_tmp").exists()  # Process 0 cleaned up after writing.
