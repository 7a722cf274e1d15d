"""Images: the sources a VQ is trained on and codes are extracted from, and the release's
preprocessing.

Sources (`open_images`): "digits" (npp_jax.data.digits), a TFDS name prepared under a data_dir
(e.g. imagenet2012, which needs its manual download), a prepared TFDS directory, or an image folder
read without TensorFlow (`open_image_folder`): one split's class folders
(`imagenet/train/<wnid>/*.JPEG`) or root/<split>/<class>/. Pixels are decoded with PIL
(.convert("RGB"), as the release's loader) and cropped as the PyTorch release does (ADM's centre
crop, torchvision's TenCrop), so codes match the release's.

Host work runs on grain's threads (`parallel_map`, and the jobs' grain pipelines in train_vq.py and
extract.py): no thread of our own.
"""

import io
import os
import random
from typing import Any, Callable, Iterator, Sequence

from absl import logging
from etils import epath
from etils import epy
import numpy as np
from PIL import Image

from npp_jax import rules

# grain (and orbax under it) loads at first use: a bad command line fails without it.
with epy.lazy_imports():
  import grain

AUGS = {"tencrop": 10, "flip": 2, "none": 1}  # Views per image (the code data set's n_aug).
# The files an image folder holds: torchvision's ImageFolder extensions, which the release reads.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


# --------------------------------------------------------------------------------------------------
# Pixels: the release's preprocessing.


def to_rgb(image) -> np.ndarray:
  """An image file (epath.Path), encoded bytes (JPEG, PNG, WebP...) or a uint8 array [H, W],
  [H, W, 1|3|4] -> uint8 [H, W, 3]."""
  if isinstance(image, epath.Path):
    return _read_file(image)
  if isinstance(image, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(image)) as im:
      return np.asarray(im.convert("RGB"))  # As the release's PIL loader: grey, CMYK, RGBA -> RGB.
  x = np.asarray(image)
  if x.dtype != np.uint8:
    raise ValueError(f"image of dtype {x.dtype}; expected uint8 pixels or encoded bytes")
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
    raise ValueError(
      f"image of shape {x.shape}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]"
    )
  if x.shape[-1] == 1:
    return np.repeat(x, 3, axis=-1)
  return x[..., :3]


def _read_file(path: epath.Path) -> np.ndarray:
  """An image file as the release's loader reads it (PIL, .convert("RGB")); one-line error when PIL
  fails on a file the folder's scan let through (a truncated file: its header reads)."""
  try:
    with path.open("rb") as f, Image.open(f) as im:
      return np.asarray(im.convert("RGB"))
  except _UNREADABLE as e:
    raise ValueError(
      f"image file {path} is unreadable ({type(e).__name__}: {e}); expected an image PIL decodes "
      "(delete the file, or replace it, then run again)"
    ) from None


def float_to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] images (npp_jax.data.digits) -> the uint8 pixels they were made from."""
  return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def center_crop_arr(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's centre crop: halve with a box filter while the short side is >= 2 * size, resize
  (bicubic) the short side to `size`, then cut the centre size x size square. uint8 [H, W, 3] ->
  [size, size, 3]."""
  im = Image.fromarray(image)
  while min(im.size) >= 2 * size:
    im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
  scale = size / min(im.size)
  im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC)
  arr = np.asarray(im)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top : top + size, left : left + size]


def crop_size(image_size: int, crop_range: float) -> int:
  """Side of the square the ten crops are cut from, as the release rounds it."""
  return int(image_size * crop_range)


def five_crop_boxes(height: int, width: int, size: int) -> list[tuple[int, int]]:
  """(top, left) of torchvision's five crops: top-left, top-right, bottom-left, bottom-right,
  centre."""
  # torchvision rounds the centre offset with Python's round (half to even): 25 / 2 -> 12.
  center = (int(round((height - size) / 2.0)), int(round((width - size) / 2.0)))
  return [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size), center]


def ten_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision's TenCrop: the five crops of the image, then the five crops of its mirror image."""
  views = []
  for im in (image, image[:, ::-1]):
    for top, left in five_crop_boxes(im.shape[0], im.shape[1], size):
      views.append(im[top : top + size, left : left + size])
  return np.stack(views)


def augment(image: np.ndarray, aug: str, image_size: int, crop_range: float = 1.1) -> np.ndarray:
  """One image's views, uint8 [AUGS[aug], image_size, image_size, 3], in the release's order."""
  if aug == "tencrop":
    return ten_crop(center_crop_arr(image, crop_size(image_size, crop_range)), image_size)
  square = center_crop_arr(image, image_size)
  if aug == "flip":
    return np.stack([square, square[:, ::-1]])
  if aug == "none":
    return square[None]
  raise ValueError(f"aug={aug!r}; expected one of {sorted(AUGS)}")


def num_threads(n: int) -> int:
  """A config's thread count: n, or (n <= 0) one per core up to 16."""
  return n if n > 0 else max(1, min(16, os.cpu_count() or 1))


def parallel_map(fn: Callable[[Any], Any], items: Sequence, threads: int) -> list:
  """[fn(x) for x in items], computed on `threads` of grain's threads, in order."""
  if not len(items):
    return []
  ds = grain.MapDataset.source(list(items)).map(fn)
  return list(
    ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads))
  )


# --------------------------------------------------------------------------------------------------
# Image sources.


class ImageSource:
  """One split of an image classification data set: `read(start, stop)` in order, `stream` at
  random.

  Images come back undecoded where the source allows it (bytes; `to_rgb` decodes), so skipping costs
  no decoding. `random_access` sources also have `get(indices)`.
  """

  name: str
  num_examples: int
  num_classes: int
  random_access: bool = False

  def read(self, start: int, stop: int) -> tuple[list, np.ndarray]:
    return self.get(range(start, stop))

  def get(self, indices: Sequence[int]) -> tuple[list, np.ndarray]:
    raise TypeError(f"{self.name} has no random access")

  def stream(self, seed: int, process_index: int, process_count: int) -> Iterator[tuple[Any, int]]:
    """Endless (image, label) in a seeded random order; every process draws from its own part."""
    rng = np.random.default_rng([seed, process_index])
    while True:
      order = rng.permutation(self.num_examples)
      for start in range(0, len(order), 256):
        images, labels = self.get(order[start : start + 256])
        yield from zip(images, labels)


class ArraySource(ImageSource):
  """Images in memory: uint8 [N, H, W, 3] and int labels [N]."""

  random_access = True

  def __init__(self, name: str, images: np.ndarray, labels: np.ndarray, num_classes: int):
    self.name, self.images, self.labels = name, images, np.asarray(labels, np.int32)
    self.num_examples, self.num_classes = len(images), num_classes

  def read(self, start, stop):
    return list(self.images[start:stop]), self.labels[start:stop]

  def get(self, indices):
    indices = np.asarray(indices, np.int64)
    return list(self.images[indices]), self.labels[indices]


class FolderSource(ImageSource):
  """Image files with their labels, in a fixed order; `get` hands out the paths (`to_rgb` reads
  them, on the consumer's threads). `skipped`: the files PIL could not open, left out."""

  random_access = True

  def __init__(self, name: str, paths: Sequence[epath.Path], labels, classes, skipped=()):
    self.name, self.paths = name, list(paths)
    self.labels, self.classes = np.asarray(labels, np.int32), list(classes)
    self.skipped = list(skipped)
    self.num_examples, self.num_classes = len(self.paths), len(self.classes)

  def get(self, indices):
    indices = np.asarray(indices, np.int64)
    return [self.paths[i] for i in indices], self.labels[indices]


class TfdsSource(ImageSource):
  """A split of a prepared TFDS data set: random access when it is stored as array_record, slices
  of the split when stored as TFRecord."""

  def __init__(self, name: str, builder, split: str, image_key: str, label_key: str):
    import tensorflow_datasets as tfds

    self.name, self.builder, self.split = name, builder, split
    self.image_key, self.label_key = image_key, label_key
    self.num_examples = int(builder.info.splits[split].num_examples)
    self.num_classes = int(builder.info.features[label_key].num_classes)
    self._decoders = {image_key: tfds.decode.SkipDecoding()}
    self.random_access = str(builder.info.file_format).lower().endswith("array_record")
    self._source = None

  def _dataset(self, split: str, shuffle: bool = False, seed: int = 0):
    import tensorflow_datasets as tfds

    read_config = tfds.ReadConfig(shuffle_seed=seed) if shuffle else None
    return self.builder.as_dataset(
      split=split, shuffle_files=shuffle, decoders=self._decoders, read_config=read_config
    )

  def _unpack(self, records) -> tuple[list, np.ndarray]:
    return (
      [r[self.image_key] for r in records],
      np.array([r[self.label_key] for r in records], np.int32).reshape(-1),
    )

  def get(self, indices):
    if not self.random_access:
      raise TypeError(f"{self.name} has no random access")
    if self._source is None:
      self._source = self.builder.as_data_source(self.split, decoders=self._decoders)
    return self._unpack(self._source.__getitems__([int(i) for i in indices]))

  def read(self, start, stop):
    import tensorflow_datasets as tfds

    if self.random_access:
      return self.get(range(start, stop))
    # TFDS skips whole files and undecoded records to reach a slice.
    return self._unpack(list(tfds.as_numpy(self._dataset(f"{self.split}[{start}:{stop}]"))))

  def stream(self, seed, process_index, process_count):
    import tensorflow_datasets as tfds

    if self.random_access:
      yield from super().stream(seed, process_index, process_count)
      return
    ds = self._dataset(self.split, shuffle=True, seed=seed).shard(process_count, process_index)
    ds = ds.repeat().shuffle(4096, seed=seed)
    for r in tfds.as_numpy(ds):
      yield r[self.image_key], int(r[self.label_key])


def open_images(
  dataset: str, split: str, data_dir: str = "", field: str = "dataset"
) -> ImageSource:
  """The split `split` of `dataset` ("digits", a TFDS name, a prepared TFDS directory or an image
  folder).

  `field` names the config field in error messages. Nothing is downloaded: TFDS data sets must be
  prepared beforehand. An image folder of one split's class folders is that split whatever `split`
  says (`split` then only names what is written, e.g. the code data set's split).
  """
  from npp_jax.data import digits

  split = rules.split_name(split, field.rsplit(".", 1)[0] + ".split")
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f"{field}={dataset!r}; expected 'digits', a TFDS name or an image folder")
  if dataset == "digits":
    if split not in digits.SPLITS:
      raise ValueError(f"split {split!r} of {field}='digits'; expected one of {digits.SPLITS}")
    images, labels = digits.load_digits(split)
    return ArraySource("digits", float_to_uint8(images), labels, digits.NUM_CLASSES)

  path = epath.Path(dataset).expanduser()
  if path.is_dir() and not (path / "dataset_info.json").exists():
    return open_image_folder(dataset, split, field)
  builder = _tfds_builder(dataset, data_dir, field)
  splits = sorted(builder.info.splits)
  if split not in splits:
    raise ValueError(f"{dataset} has no split {split!r}; expected one of {splits}")
  image_key, label_key = tuple(builder.info.supervised_keys or ("image", "label"))[:2]
  features = builder.info.features
  if (
    image_key not in features
    or label_key not in features
    or not hasattr(features[label_key], "num_classes")
  ):
    raise ValueError(
      f"{dataset} has features {sorted(features)}; expected an image feature and a class "
      f"label ({image_key!r}, {label_key!r})"
    )
  source = TfdsSource(dataset, builder, split, image_key, label_key)
  if not source.random_access:
    _need_tensorflow(field, dataset, "a TFRecord TFDS data set")
  return source


def _tfds_builder(dataset: str, data_dir: str, field: str):
  import tensorflow_datasets as tfds

  path = epath.Path(dataset).expanduser()
  if path.is_dir():  # open_images sends only prepared TFDS directories here.
    return tfds.builder_from_directory(str(path))
  if "/" in dataset or dataset.startswith((".", "~")):  # A path (local or gs://) that is not there.
    raise ValueError(
      f"{field}={dataset!r} does not exist; expected an image folder, a prepared TFDS "
      "directory, a TFDS name or 'digits'"
    )
  try:
    builder = tfds.builder(dataset, data_dir=data_dir or None)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(
      f"{field}={dataset!r} is not a TFDS data set, an existing folder or 'digits'; "
      "expected one of those"
    ) from None
  if not builder.is_prepared():
    where = data_dir or "(TFDS default)"
    raise ValueError(
      f"TFDS data set {dataset!r} is not prepared under data_dir={where!r}; expected it "
      "built beforehand (`tfds build`; imagenet2012 needs --manual_dir)"
    )
  return builder


def _need_tensorflow(field: str, dataset: str, what: str) -> None:
  """TFDS reads TFRecord files through TensorFlow, which the package does not install."""
  try:
    import tensorflow  # noqa: F401
  except ImportError:
    raise ValueError(
      f"{field}={dataset!r} is {what}, which TFDS reads through TensorFlow; expected "
      "TensorFlow installed (pip install tensorflow-cpu), or the data set prepared as "
      "array_record (tfds build --file_format=array_record)"
    ) from None


# -------------------------------------------------------------------------------------------------
# Image folders, without TensorFlow.

# What PIL raises for a file it cannot read: not an image, an unknown format, a broken header or
# stream, a decompression bomb.
_UNREADABLE = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_image_folder(dataset: str, split: str, field: str = "dataset") -> FolderSource:
  """The images of a folder of class folders: `dataset` is one split (`imagenet/train`) or
  root/<split>/.

  Classes are numbered by sorted folder name over all splits (torchvision's ImageFolder order, which
  the released checkpoints' class ids follow; hidden folders are no class). A class folder's files
  with torchvision's image extensions are read, in its subfolders too. The order is TFDS
  ImageFolder's (sorted by class and path, then shuffled by a generator seeded with the split's
  name), so that the first N images are a sample of every class and codes equal those TFDS's reader
  gave. Files PIL cannot open are left out, counted and logged.
  """
  root = epath.Path(dataset).expanduser()
  split_dir, classes, split_name = _folder_split(root, split, field, dataset)
  ids = {c: i for i, c in enumerate(classes)}
  examples = []
  for folder in _subfolders(split_dir):
    names = (
      str(top / n)
      for top, _, files in folder.walk()
      for n in files
      if n.lower().endswith(IMAGE_EXTENSIONS)
    )
    examples += [(p, ids[folder.name]) for p in sorted(names)]
  random.Random(split_name).shuffle(examples)  # TFDS ImageFolder's order (image_folder.py).
  paths = [epath.Path(p) for p, _ in examples]
  ok = parallel_map(_opens, paths, num_threads(0))  # Every file's header, on grain's threads.
  skipped = [p for p, good in zip(paths, ok) if not good]
  if skipped:
    logging.warning(
      "%s: %d of %d image files are unreadable and left out (first: %s).",
      split_dir,
      len(skipped),
      len(paths),
      ", ".join(str(p) for p in skipped[:3]),
    )
  kept = [(p, label) for p, (_, label), good in zip(paths, examples, ok) if good]
  if not kept:
    raise ValueError(
      f"{field}={dataset!r}: {split_dir} holds no readable image ({len(skipped)} unreadable); "
      f"expected class folders of {'/'.join(e.lstrip('.') for e in IMAGE_EXTENSIONS[:5])}... files"
    )
  logging.info("Image folder %s: %d images of %d classes.", split_dir, len(kept), len(classes))
  return FolderSource(dataset, [p for p, _ in kept], [y for _, y in kept], classes, skipped)


def _subfolders(folder: epath.Path) -> list[epath.Path]:
  return sorted(
    (p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir()),
    key=lambda p: p.name,
  )


def _holds_images(folder: epath.Path) -> bool:
  return any(p.name.lower().endswith(IMAGE_EXTENSIONS) for p in folder.iterdir())


def _folder_split(root: epath.Path, split: str, field: str, dataset: str):
  """(the split's folder, the class names of every split sorted, the split's name)."""
  subfolders = _subfolders(root)
  if any(_holds_images(d) for d in subfolders):  # One split: its class folders.
    return root, [d.name for d in subfolders], root.name
  splits = {d.name: d for d in subfolders if _subfolders(d)}  # Folders of class folders.
  if not splits:
    raise ValueError(
      f"{field}={dataset!r} is a folder without class folders of images; expected "
      "<class>/<image> (one split, e.g. imagenet/train), root/<split>/<class>/<image>, or a "
      "prepared TFDS directory"
    )
  if split not in splits:
    raise ValueError(
      f"image folder {dataset} has no split {split!r}; expected one of {sorted(splits)}"
    )
  classes = sorted({c.name for d in splits.values() for c in _subfolders(d)})
  return splits[split], classes, split


def _opens(path: epath.Path) -> bool:
  """Whether PIL identifies the file (reads its header only: a truncated file passes)."""
  try:
    with path.open("rb") as f, Image.open(f) as im:
      return im.size[0] > 0 and im.size[1] > 0
  except _UNREADABLE:
    return False
