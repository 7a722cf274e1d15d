"""The release's preprocessing against a NumPy reference, and image sources (prepared TFDS directories read in
order and streamed into train_vq's batches)."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from npp_jax.data import digits
from npp_jax.data import images as images_lib
from npp_jax.jobs import train_vq
from npp_jax.models import vq

# --------------------------------------------------------------------------------------- preprocessing


def reference_views(square, size, aug):
  """NumPy reference of the release's views of an already square image (torchvision TenCrop)."""
  n = square.shape[0]
  if aug == "none":
    return square[None]
  if aug == "flip":
    return np.stack([square, np.flip(square, axis=1)])
  c = int(round((n - size) / 2.0))  # torchvision's centre offset (Python round: half to even).
  boxes = [(0, 0), (0, n - size), (n - size, 0), (n - size, n - size), (c, c)]
  out = [square[t : t + size, l : l + size] for t, l in boxes]
  mirror = np.flip(square, axis=1)
  out += [mirror[t : t + size, l : l + size] for t, l in boxes]
  return np.stack(out)


@pytest.mark.parametrize(
  "aug,crop_range,size,side",
  [
    ("tencrop", 1.1, 32, 35),
    ("tencrop", 1.05, 32, 33),
    ("tencrop", 1.1, 256, 281),
    ("flip", 1.1, 32, 32),
    ("none", 1.1, 32, 32),
  ],
)
def test_views_match_numpy_reference(aug, crop_range, size, side):
  if aug == "tencrop":
    assert images_lib.crop_size(size, crop_range) == side  # int(size * range), as the release.
  rng = np.random.default_rng(side)
  square = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
  got = images_lib.augment(square, aug, size, crop_range)
  want = reference_views(square, size, aug)
  assert got.shape == (images_lib.AUGS[aug], size, size, 3) and got.dtype == np.uint8
  np.testing.assert_array_equal(got, want)
  if (
    aug == "tencrop"
  ):  # Mirror views are the plain views of the mirror image: view 5 = flip of view 1.
    np.testing.assert_array_equal(got[5], np.flip(got[1], axis=1))


def test_center_crop_of_a_wide_image_and_pixel_values():
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (35, 50, 3), dtype=np.uint8)  # Short side already 35: a pure crop.
  np.testing.assert_array_equal(images_lib.center_crop_arr(wide, 35), wide[:, 7:42])
  big = rng.integers(
    0, 256, (80, 100, 3), dtype=np.uint8
  )  # Box-halved to 40x50, then bicubic to 35.
  half = Image.fromarray(big).resize((50, 40), resample=Image.BOX)
  want = np.asarray(half.resize((44, 35), resample=Image.BICUBIC))[:, 4:39]
  np.testing.assert_array_equal(images_lib.center_crop_arr(big, 35), want)
  # uint8 -> [-1, 1] as the release's ToTensor + Normalize, and as npp_jax.digits makes its images.
  p = np.arange(256, dtype=np.uint8)
  np.testing.assert_array_equal(vq.PIXEL_VALUES, p.astype(np.float32) / 127.5 - 1.0)
  images, _ = digits.load_digits("test")
  np.testing.assert_array_equal(
    vq.PIXEL_VALUES[images_lib.float_to_uint8(images[:20])], images[:20]
  )


def test_an_image_folder_without_tensorflow_is_refused_in_one_line(tmp_path):
  """TensorFlow is no dependency of the package; TFDS needs it for image folders: a one-line error up front."""
  root = tmp_path / "images"
  os.makedirs(root / "train" / "cat")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "train" / "cat" / "0.png")
  code = (
    "import importlib.abc, importlib.util, sys\n"
    "class NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):\n"  # `import` fails.
    "  def find_spec(self, name, path, target=None):\n"
    "    if name.split('.')[0] == 'tensorflow':\n"
    "      return importlib.util.spec_from_loader(name, self)\n"
    "  def create_module(self, spec):\n"
    "    raise ModuleNotFoundError(f'No module named {spec.name!r}')\n"
    "  def exec_module(self, module):\n"
    "    pass\n"
    "sys.meta_path.insert(0, NoTensorFlow())\n"
    "from npp_jax.data import images\n"
    "try:\n"
    f"  images.open_images({str(root)!r}, 'train', field='extract.dataset')\n"
    "except ValueError as e:\n"
    "  print('error:', e)\n"
  )
  root_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=root_dir, capture_output=True, text=True, timeout=300
  )
  assert out.stdout.strip() == (
    f"error: extract.dataset={str(root)!r} is an image folder, which TFDS reads "
    "through TensorFlow; expected TensorFlow installed (pip install tensorflow-cpu), "
    "or the data set prepared as array_record (tfds build --file_format=array_record)"
  ), out.stderr[-2000:]


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_prepared_tfds_directories_read_in_order_and_stream(tmp_path, file_format):
  """A prepared TFDS data set: random access (array_record) or slices (TFRecord), JPEG/PNG bytes decoded
  by PIL; train_vq's batches from it."""
  pytest.importorskip("tensorflow")  # TFDS's writer encodes the images with it.
  import tensorflow_datasets as tfds

  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (30 + i, 36, 3), dtype=np.uint8) for i in range(12)]
  path = str(tmp_path / "toy")
  os.makedirs(path)
  features = tfds.features.FeaturesDict(
    {
      "image": tfds.features.Image(shape=(None, None, 3)),
      "label": tfds.features.ClassLabel(num_classes=4),
    }
  )
  info = tfds.core.DatasetInfo(
    builder=tfds.core.DatasetIdentity(name="toy", version="1.0.0", data_dir=path, module_name=""),
    features=features,
    supervised_keys=("image", "label"),
  )
  writer = tfds.core.SequentialWriter(
    ds_info=info, max_examples_per_shard=5, file_format=file_format
  )
  writer.initialize_splits(["train"])
  writer.add_examples({"train": [{"image": im, "label": i % 4} for i, im in enumerate(images)]})
  writer.close_splits(["train"])

  source = images_lib.open_images(path, "train")
  assert (source.num_examples, source.num_classes) == (12, 4)
  assert source.random_access == (file_format == "array_record")
  got, labels = source.read(3, 9)  # Across shard files.
  for k, image in enumerate(got):
    np.testing.assert_array_equal(images_lib.to_rgb(image), images[3 + k])
  np.testing.assert_array_equal(labels, [(3 + k) % 4 for k in range(6)])
  batches = train_vq._vq_batches(source, 32, 4, seed=0, start_step=0, random_flip=True, threads=2)
  for _ in range(4):  # 16 images: more than one pass over the 12.
    batch = next(batches)
    assert batch.shape == (4, 32, 32, 3) and batch.dtype == np.uint8
  batches.close()
  with pytest.raises(ValueError, match="has no split 'test'"):
    images_lib.open_images(path, "test")
