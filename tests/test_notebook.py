"""notebooks/sample.ipynb run as a Colab user runs it, minus the network.

A fresh kernel whose working directory is a folder outside the repository (Colab's /content, under
tmp_path) runs every cell in order. The notebook's documented environment variables replace what
needs the network: NPP_SKIP_INSTALL (the package is installed in this venv), NPP_REPO_DIR (the
clone), NPP_WEIGHTS_DIR (checkpoints written here in the release's PyTorch formats instead of the
Hub's) and NPP_CONFIG_OVERRIDES (a tiny model in place of GPT-B, so that it runs in seconds). Form
fields are edited the way Colab's forms edit them: the value on the `#@param` line.
"""

import argparse
import ast
import glob
import json
import os
import re

import nbformat
import numpy as np
from PIL import Image
import pytest

torch = pytest.importorskip("torch")

from support import torch_reference as ref  # noqa: E402
from support.paths import ROOT  # noqa: E402

NOTEBOOK = os.path.join(ROOT, "notebooks", "sample.ipynb")
# GPT-B's config file with these overrides: a 2-layer GPT on an 8x8 grid of 64 codes, and a VQ with
# one downsampling from 16 px, both in fp32.
OVERRIDES = {
  "model.name": "custom",
  "model.n_layer": 2,
  "model.n_head": 2,
  "model.dim": 32,
  "model.multiple_of": 32,
  "model.vocab_size": 64,
  "model.num_classes": 10,
  "model.grid": [8, 8],
  "model.dtype": "float32",
  "vq.ch": 32,
  "vq.ch_mult": [1, 2],
  "vq.num_res_blocks": 1,
  "vq.z_channels": 32,
  "vq.codebook_size": 64,
  "vq.codebook_embed_dim": 8,
  "vq.image_size": 16,
}


def release_checkpoints(folder):
  """c2i_B_256.pt and vq_ds16_c2i.pt of the overridden sizes, random weights, saved as the releases
  save."""
  m, v = (
    {k[6:]: x for k, x in OVERRIDES.items() if k.startswith("model.")},
    {k[3:]: x for k, x in OVERRIDES.items() if k.startswith("vq.")},
  )
  gpt = ref.randomize_(
    ref.GPT(
      m["n_layer"],
      m["n_head"],
      m["dim"],
      m["vocab_size"],
      m["num_classes"],
      m["grid"],
      multiple_of=m["multiple_of"],
    ),
    seed=0,
  )
  vq = ref.randomize_(
    ref.VQModel(
      v["codebook_size"],
      v["codebook_embed_dim"],
      v["z_channels"],
      v["ch"],
      v["ch_mult"],
      v["num_res_blocks"],
    ),
    seed=1,
  )
  os.makedirs(folder)
  # Training scripts save their argparse arguments beside the weights.
  torch.save(
    {"model": gpt.state_dict(), "steps": 10, "args": argparse.Namespace(gpt_model="GPT-B")},
    os.path.join(folder, "c2i_B_256.pt"),
  )
  torch.save({"model": vq.state_dict()}, os.path.join(folder, "vq_ds16_c2i.pt"))


def code_cells(nb):
  return [c for c in nb.cells if c.cell_type == "code"]


def set_param(nb, name, value):
  """Set one form field as Colab's form does: the value on the `NAME = value  #@param ...` line."""
  pattern = re.compile(rf"^{name} = .*?(  #@param .*)$", re.M)
  hits = [c for c in code_cells(nb) if pattern.search(c.source)]
  assert len(hits) == 1, name
  hits[0].source = pattern.sub(lambda m: f"{name} = {value}{m.group(1)}", hits[0].source)


def texts(cell):
  return "".join(
    o.get("text", "") + "".join(o.get("data", {}).get("text/plain", ""))
    for o in cell.get("outputs", [])
  )


def test_notebook_runs_top_to_bottom_outside_the_repository(tmp_path, monkeypatch):
  from nbclient import NotebookClient

  release_checkpoints(str(tmp_path / "release"))
  content = tmp_path / "content"  # Colab's working directory and the root of every default path.
  (content / "drive" / "MyDrive").mkdir(parents=True)  # Drive mounted.
  nb = nbformat.read(NOTEBOOK, as_version=4)
  for cell in code_cells(nb):
    assert '"configs/' not in cell.source  # Nothing relative to the repository root.
    cell.source = cell.source.replace('"/content/', f'"{content}/')
  set_param(nb, "CLASSES", '"0 tench, goldfish"')  # By id and by name.
  set_param(nb, "IMAGES_PER_CLASS", "2")  # 4 images on 8 devices: padded.
  monkeypatch.setenv("NPP_SKIP_INSTALL", "1")
  monkeypatch.setenv("NPP_REPO_DIR", ROOT)
  monkeypatch.setenv("NPP_WEIGHTS_DIR", str(tmp_path / "release"))
  monkeypatch.setenv("NPP_CONFIG_OVERRIDES", json.dumps(OVERRIDES))

  client = NotebookClient(
    nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(content)}}
  )
  with client.setup_kernel():
    for index, cell in enumerate(nb.cells):
      client.execute_cell(cell, index)
    weights = next(i for i, c in enumerate(nb.cells) if "start_conversion(" in c.source)
    log = texts(nb.cells[weights])
    assert log.count("converted in") == 2 and "already converted" not in log
    # Run again without the release files: both conversions are found and nothing is read.
    monkeypatch.setenv("NPP_WEIGHTS_DIR", str(tmp_path / "gone"))
    client.execute_cell(nb.cells[weights], weights)
    assert texts(nb.cells[weights]).count("already converted") == 2

  out = "\n".join(texts(c) for c in code_cells(nb))
  assert "8 cpu device(s)" in out and "NPP_SKIP_INSTALL=1" in out
  # float32: the CPU's compute dtype ("auto" picks bfloat16 on a GPU or TPU).
  assert (
    "0 tench, 1 goldfish" in out
    and "float32, batch 8 = 8 device(s) x 1" in out
    and "images/s" in out
  )
  [run] = glob.glob(str(content / "npp_samples" / "run_*"))
  with np.load(os.path.join(run, "samples", "samples_4.npz")) as f:
    images, labels, codes = f["arr_0"], f["labels"], f["codes"]
  assert images.shape == (4, 16, 16, 3) and images.dtype == np.uint8 and images.std() > 0
  np.testing.assert_array_equal(labels, [0, 1, 0, 1])
  assert codes.shape == (4, 8, 8) and 0 <= codes.min() and codes.max() < 64
  grid = np.asarray(Image.open(os.path.join(run, "samples", "samples_4.png")))
  assert grid.shape == (2 * 16, 2 * 16, 3)
  # Row r of the grid holds the first images of the r-th class: samples 0, 2 (tench) and 1, 3
  # (goldfish).
  np.testing.assert_array_equal(grid[:16, 16:], images[2])
  np.testing.assert_array_equal(grid[16:, :16], images[1])
  labeled = Image.open(os.path.join(run, "samples", "samples_4_labeled.png"))
  assert labeled.height == 32 and labeled.width > 32  # The grid and a column of class names.
  assert any("image/png" in o.get("data", {}) for c in code_cells(nb) for o in c.get("outputs", []))
  drive = content / "drive" / "MyDrive" / "npp_samples" / os.path.basename(run)
  assert sorted(os.listdir(drive)) == ["samples_4.npz", "samples_4.png", "samples_4_labeled.png"]


def test_notebook_class_names_are_imagenets():
  """The notebook's table of class names against torchvision's ImageNet categories (shipped
  offline)."""
  meta = pytest.importorskip("torchvision.models._meta")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  [cell] = [c for c in code_cells(nb) if "IMAGENET_NAMES = {" in c.source]
  tree = ast.parse(cell.source)
  table = next(
    ast.literal_eval(node.value)
    for node in tree.body
    if isinstance(node, ast.Assign) and node.targets[0].id == "IMAGENET_NAMES"
  )
  assert len(table) >= 40
  for i, name in table.items():
    assert meta._IMAGENET_CATEGORIES[i] == name, i
