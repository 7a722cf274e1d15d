"""Code data sets: the tokenized images the GPT trainer reads, built without a VQ (make_codes,
write_codes, the module-scoped `dataset` fixture), and read_split for the data sets extraction
writes."""

import numpy as np
import pytest

from npp_jax.data import code_dataset


def make_codes(n, seed=0, vocab=256, classes=10, n_aug=2):
  """Learnable codes: each class draws a smooth pattern, with per-image noise and two
  augmentations."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, classes, size=n)
  rows, cols = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
  base = (labels[:, None, None] * 23 + rows[None] * 3 + cols[None]) % vocab
  codes = np.stack(
    [(base + rng.integers(0, 2, size=base.shape) + a) % vocab for a in range(n_aug)], 1
  )
  return codes.astype(np.int32), labels.astype(np.int32)


def write_codes(path, n=64):
  """make_codes(n) written as a code data set at `path` (256 codes, 10 classes); returns path."""
  codes, labels = make_codes(n)
  code_dataset.write_code_dataset(path, codes, labels, vocab_size=256, num_classes=10)
  return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """A module's code data set of 64 images (import it into the test module to use it)."""
  return write_codes(str(tmp_path_factory.mktemp("codes") / "ds"))


def read_split(path, split):
  """(codes, labels) of one split of the code data set at `path`, in its order."""
  source = __import__("tensorflow_datasets").builder_from_directory(path).as_data_source(split)
  records = [source[i] for i in range(len(source))]
  return np.stack([r["codes"] for r in records]).astype(np.int32), np.array(
    [r["label"] for r in records]
  )
