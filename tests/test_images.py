"""The release's preprocessing against a NumPy reference, and image sources (prepared TFDS
directories read in order and streamed into train_vq's batches)."""

import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest
from support.images import NO_TENSORFLOW
from support.images import make_split_folder
from support.images import write_image
from support.paths import ROOT

from npp_jax.data import digits
from npp_jax.data import images as images_lib
from npp_jax.jobs import train_vq
from npp_jax.models import vq

# ------------------------------------------------------------------------------------ preprocessing


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


def test_an_image_folder_reads_without_tensorflow(tmp_path):
  """JPEG, PNG (grey, RGBA, palette), WebP and CMYK files of one split's class folders, decoded by
  PIL to RGB as the release's loader does, classes numbered by sorted name, junk skipped and
  counted, in a process where TensorFlow cannot be imported."""
  folder = str(tmp_path / "imagenet" / "train")
  good, bad = make_split_folder(folder)
  out = str(tmp_path / "read.npz")
  code = NO_TENSORFLOW + (
    "import numpy as np\n"
    "from npp_jax.data import images\n"
    f"s = images.open_images({folder!r}, 'train', field='extract.dataset')\n"
    "paths, labels = s.get(range(s.num_examples))\n"
    "pixels = [images.to_rgb(p) for p in paths]\n"
    f"np.savez({out!r}, paths=[str(p) for p in paths], labels=labels, classes=s.classes,\n"
    "  skipped=sorted(str(p) for p in s.skipped), pixels=np.array(pixels, dtype=object))\n"
    "print('tensorflow' in sys.modules)\n"
  )
  run = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
  )
  assert run.returncode == 0 and run.stdout.strip() == "False", run.stderr[-3000:]
  with np.load(out, allow_pickle=True) as z:
    paths, labels, classes = list(z["paths"]), z["labels"], list(z["classes"])
    skipped, pixels = list(z["skipped"]), list(z["pixels"])
  assert classes == ["n01", "n02", "n03", "n04"]
  assert sorted(paths) == sorted(good) and skipped == sorted(bad)
  for path, label, got in zip(paths, labels, pixels):
    assert classes[label] == os.path.relpath(path, folder).split(os.sep)[0]
    with Image.open(path) as im:
      want = np.asarray(im.convert("RGB"))
    assert got.dtype == np.uint8 and got.shape == (*want.shape[:2], 3)
    np.testing.assert_array_equal(got, want)


def test_image_folder_layouts_and_bad_folders(tmp_path):
  """root/<split>/<class>: classes numbered over every split; one-line errors for what is no image
  folder, a split that is not there, and a folder whose images are all unreadable."""
  root = tmp_path / "root"
  write_image(str(root / "train" / "cat" / "0.png"), "RGB", (36, 36), 0)
  write_image(str(root / "train" / "dog" / "0.png"), "RGB", (36, 36), 1)
  write_image(str(root / "val" / "dog" / "1.png"), "RGB", (36, 36), 2)  # val has no cat.
  val = images_lib.open_images(str(root), "val")
  assert (val.num_examples, val.classes, list(val.labels)) == (1, ["cat", "dog"], [1])
  assert images_lib.open_images(str(root / "train"), "anything").classes == ["cat", "dog"]
  with pytest.raises(ValueError, match=r"has no split 'test'; expected one of \['train', 'val'\]"):
    images_lib.open_images(str(root), "test")
  (tmp_path / "flat").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "flat" / "0.png")
  with pytest.raises(ValueError, match="is a folder without class folders of images; expected"):
    images_lib.open_images(str(tmp_path / "flat"), "train", field="vq_train.dataset")
  (tmp_path / "junk" / "cat").mkdir(parents=True)
  (tmp_path / "junk" / "cat" / "0.jpg").write_bytes(b"")
  with pytest.raises(ValueError, match=r"junk holds no readable image \(1 unreadable\)") as e:
    images_lib.open_images(str(tmp_path / "junk"), "train", field="extract.dataset")
  assert "\n" not in str(e.value)
  # A truncated file passes the header scan and is refused, by name, when it is decoded.
  data = (root / "train" / "cat" / "0.png").read_bytes()
  (root / "train" / "cat" / "0.png").write_bytes(data[: len(data) // 2])
  source = images_lib.open_images(str(root), "train")
  paths, _ = source.get(range(source.num_examples))
  cat = [p for p in paths if p.parent.name == "cat"][0]
  with pytest.raises(ValueError, match=r"image file .*0\.png is unreadable \("):
    images_lib.to_rgb(cat)


def test_image_folder_order_and_labels_are_tfds_image_folders(tmp_path):
  """The order (a fixed shuffle) and labels of TFDS's ImageFolder, which extraction read before, for
  root/<split>/ and for the same split's folder given alone."""
  pytest.importorskip("tensorflow")  # TFDS's ImageFolder reads through it.
  import tensorflow_datasets as tfds

  root = tmp_path / "root"
  for k in range(40):
    split = "train" if k % 4 else "val"
    write_image(str(root / split / f"c{k % 5}" / f"{k:03d}.png"), "RGB", (20, 20), k)
  builder = tfds.folder_dataset.ImageFolder(str(root))
  for split in ("train", "val"):
    records = list(tfds.as_numpy(builder.as_dataset(split)))
    want = [(r["image/filename"].decode(), int(r["label"])) for r in records]
    for source in (
      images_lib.open_images(str(root), split),
      images_lib.open_images(str(root / split), "ignored"),
    ):
      paths, labels = source.get(range(source.num_examples))
      assert [(str(p), int(y)) for p, y in zip(paths, labels)] == want
      assert source.classes == builder.info.features["label"].names


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_prepared_tfds_directories_read_in_order_and_stream(tmp_path, file_format):
  """A prepared TFDS data set: random access (array_record) or slices (TFRecord), JPEG/PNG bytes
  decoded by PIL; train_vq's batches from it."""
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
