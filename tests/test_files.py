"""The file layer: npp_jax.files on `gs://` paths (served from a local folder, support/fake_gcs.py),
and a guard that fails when a module of the VQ jobs hands a user path to `open()` / `os.*` /
`shutil` again."""

import ast
import inspect
import json
import os

import numpy as np
import pytest
from support.fake_gcs import fake_gcs

from npp_jax import caption_codes
from npp_jax import checkpoints
from npp_jax import convert
from npp_jax import files
from npp_jax import main
from npp_jax import npy_captions
from npp_jax import npy_codes
from npp_jax import preflight
from npp_jax import sampling
from npp_jax import summaries
from npp_jax import text
from npp_jax import text_encoder
from npp_jax.data import caption_index
from npp_jax.data import captions
from npp_jax.data import code_dataset
from npp_jax.data import images
from npp_jax.fid import features
from npp_jax.fid import images as image_sets
from npp_jax.fid import scores as fid_scores
from npp_jax.jobs import evaluate
from npp_jax.jobs import extract
from npp_jax.jobs import sample
from npp_jax.jobs import train
from npp_jax.jobs import train_vq


def test_absolute_leaves_a_scheme_alone_and_anchors_a_relative_path(tmp_path, monkeypatch):
  assert str(files.absolute("gs://bucket/run/checkpoints")) == "gs://bucket/run/checkpoints"
  monkeypatch.chdir(tmp_path)
  assert str(files.absolute("run/vq")) == str(tmp_path / "run" / "vq")


def test_atomic_write_settings_and_json_on_gs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # Where a path mangled by os.* would land: <cwd>/gs:/...
  root = tmp_path / "bucket_root"
  with fake_gcs(root):
    from etils import epath

    folder = epath.Path("gs://bucket/run/extract_tmp/test")
    folder.mkdir(parents=True)
    files.atomic_write(folder / "shard_000000.npz", lambda f: np.savez(f, codes=np.arange(6)))
    files.write_json(str(folder / "settings.json"), {"batch_size": 64, "aug": "flip"})
    assert files.read_json("gs://bucket/run/extract_tmp/test/settings.json") == {
      "batch_size": 64,
      "aug": "flip",
    }
    assert files.read_json("gs://bucket/run/missing.json") is None
    files.check_same_settings(
      folder / "settings.json", {"batch_size": 64}, folder, "shards", "expected same"
    )
    with pytest.raises(
      ValueError,
      match=r"gs://bucket/run/extract_tmp/test holds shards of other settings "
      r"\(batch_size: 64 there, 128 now\)",
    ):
      files.check_same_settings(
        folder / "settings.json", {"batch_size": 128}, folder, "shards", "expected same"
      )
  local = root / "bucket" / "run" / "extract_tmp" / "test"
  assert sorted(os.listdir(local)) == ["settings.json", "shard_000000.npz"]  # No .tmp left behind.
  with np.load(local / "shard_000000.npz") as z:
    np.testing.assert_array_equal(z["codes"], np.arange(6))
  assert json.loads((local / "settings.json").read_text()) == {"batch_size": 64, "aug": "flip"}
  assert not os.path.exists(tmp_path / "gs:")


# Calls that take a path and bypass the file layer. os.fspath, os.environ, os.cpu_count... take
# none.
_FORBIDDEN_OS = {
  "path",
  "makedirs",
  "mkdir",
  "remove",
  "unlink",
  "rename",
  "replace",
  "listdir",
  "scandir",
  "walk",
  "rmdir",
  "stat",
  "open",
  "chdir",
}


def _bypasses(source: str) -> list[str]:
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "open":
      found.append(f"open() at line {node.lineno}")
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
      if node.value.id == "os" and node.attr in _FORBIDDEN_OS:
        found.append(f"os.{node.attr} at line {node.lineno}")
      if node.value.id in ("shutil", "glob"):
        found.append(f"{node.value.id}.{node.attr} at line {node.lineno}")
  return found


@pytest.mark.parametrize(
  "module",
  [
    files,
    checkpoints,
    convert,
    images,
    extract,
    train_vq,
    code_dataset,
    sample,
    sampling,
    train,
    summaries,
    preflight,
    main,
    npy_codes,
    evaluate,
    features,
    fid_scores,
    image_sets,
    text,
    text_encoder,
    captions,
    caption_index,
    npy_captions,
    caption_codes,
  ],
  ids=lambda m: m.__name__,
)
def test_no_user_path_reaches_open_or_os(module):
  assert _bypasses(inspect.getsource(module)) == [], f"{module.__name__} bypasses etils.epath"


def test_the_guard_catches_each_kind_of_bypass():
  source = (
    "import os, shutil\n"
    "def save(path, workdir):\n"
    "  os.makedirs(os.path.join(workdir, 'x'))\n"
    "  with open(path, 'wb') as f:\n"
    "    f.write(b'')\n"
    "  shutil.rmtree(workdir)\n"
    "  return os.cpu_count(), os.fspath(path)\n"
  )
  assert sorted(_bypasses(source)) == [
    "open() at line 4",
    "os.makedirs at line 3",
    "os.path at line 3",
    "shutil.rmtree at line 6",
  ]
