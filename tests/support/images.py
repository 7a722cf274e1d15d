"""Image folders as users keep them (random images of every PIL mode, the junk real folders hold),
and NO_TENSORFLOW: the source that makes a child interpreter one where TensorFlow is not
installed."""

import os

import numpy as np
from PIL import Image

# A child interpreter in which `import tensorflow` fails, as where TensorFlow is not installed.
NO_TENSORFLOW = (
  "import importlib.abc, importlib.util, sys\n"
  "class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"
  "  def find_spec(self, name, path, target=None):\n"
  "    if name.split('.')[0] == 'tensorflow':\n"
  "      return importlib.util.spec_from_loader(name, self)\n"
  "  def create_module(self, spec):\n"
  "    raise ModuleNotFoundError(f'No module named {spec.name!r}')\n"
  "  def exec_module(self, module):\n"
  "    pass\n"
  "sys.meta_path.insert(0, NoTensorFlow())\n"
)


def write_image(path, mode, size, seed, fmt=None):
  """A random image of PIL mode `mode` (RGB, L, RGBA, P, CMYK) saved at `path`."""
  rng = np.random.default_rng(seed)
  w, h = size
  if mode in ("L", "P"):
    im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    im = im.convert("P") if mode == "P" else im
  else:
    im = Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  im.save(path, fmt)


def make_split_folder(folder):
  """One split's class folders as users keep ImageNet (train/<wnid>/*.JPEG), with the formats and
  the junk a real folder holds; returns (the readable files, the unreadable ones)."""
  good = {
    "n01/a.JPEG": ("RGB", (40, 36), "JPEG"),
    "n01/b.png": ("L", (35, 48), "PNG"),  # Greyscale.
    "n01/deeper/c.jpg": ("RGB", (36, 36), "JPEG"),  # In a subfolder: read, as torchvision does.
    "n02/d.webp": ("RGB", (50, 40), "WEBP"),
    "n02/e.jpg": ("CMYK", (38, 44), "JPEG"),  # ImageNet holds a few CMYK JPEGs.
    "n03/f.png": ("RGBA", (36, 40), "PNG"),
    "n03/g.PNG": ("P", (44, 36), "PNG"),  # Palette.
  }
  for k, (name, (mode, size, fmt)) in enumerate(good.items()):
    write_image(os.path.join(folder, name), mode, size, seed=k, fmt=fmt)
  bad = ["n01/empty.JPEG", "n02/not_an_image.png", "n03/._f.png"]  # ._f.png: a macOS fork file.
  for name in bad:
    with open(os.path.join(folder, name), "wb") as f:
      f.write(b"" if "empty" in name else b"<html>404</html>")
  with open(os.path.join(folder, "n01", "README.txt"), "w") as f:  # No image extension: not read.
    f.write("notes")
  write_image(os.path.join(folder, ".ipynb_checkpoints", "x.png"), "RGB", (36, 36), 9)  # No class.
  os.makedirs(os.path.join(folder, "n04"))  # An empty class still takes its number.
  return [os.path.join(folder, n) for n in good], [os.path.join(folder, n) for n in bad]
