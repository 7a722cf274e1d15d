"""The tokenizer jobs: train a VQ on images (`train_vq`) and turn a data set's images into codes (`extract`).

  python -m npp_jax.main --mode=train_vq --config=configs/demo.py --workdir=W   # -> W/vq
  python -m npp_jax.main --mode=extract --config=configs/b.py --workdir=W \
      --config.extract.vq_checkpoint=/ckpt/vq16 --config.extract.data_dir=/data/tfds   # -> W/codes

Images come from `open_images`: "digits" (npp_jax.digits), a TFDS name prepared under a data_dir (e.g.
imagenet2012, which needs its manual download), a prepared TFDS directory, or an image folder
root/<split>/<class>/*.{png,jpg} read through TFDS's ImageFolder. Pixels are decoded with PIL and cropped
as the PyTorch release does (ADM's centre crop, torchvision's TenCrop), so codes match the release's.

Both jobs resume when run again: train_vq from its orbax checkpoints, extract from its finished shards.
"""
import concurrent.futures
import dataclasses
import functools
import io
import json
import os
import queue
import re
import shutil
import threading
import time
from typing import Any, Iterator, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from npp_jax import checkpoints
from npp_jax import data
from npp_jax import files
from npp_jax import sharding
from npp_jax.models import vq

AUGS = {"tencrop": 10, "flip": 2, "none": 1}  # Views per image (the code data set's n_aug).

# uint8 -> [-1, 1] as the release's ToTensor + Normalize(0.5, 0.5): (p / 255 - 0.5) / 0.5 in fp32. A table
# gathered on device: XLA turns the division into a multiplication that differs in the last bit.
PIXEL_VALUES = ((np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5))
                / np.float32(0.5)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Pixels: the release's preprocessing.


def to_rgb(image) -> np.ndarray:
  """Encoded bytes (PNG, JPEG) or a uint8 array [H, W], [H, W, 1|3|4] -> uint8 [H, W, 3]."""
  if isinstance(image, (bytes, np.bytes_)):
    with Image.open(io.BytesIO(image)) as im:
      return np.asarray(im.convert("RGB"))  # As the release's PIL loader: grey, CMYK, RGBA -> RGB.
  x = np.asarray(image)
  if x.dtype != np.uint8:
    raise ValueError(f"image of dtype {x.dtype}; expected uint8 pixels or encoded bytes")
  if x.ndim == 2:
    x = x[..., None]
  if x.ndim != 3 or x.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image of shape {x.shape}; expected [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
  if x.shape[-1] == 1:
    return np.repeat(x, 3, axis=-1)
  return x[..., :3]


def float_to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] images (npp_jax.digits) -> the uint8 pixels they were made from."""
  return np.clip(np.rint((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def center_crop_arr(image: np.ndarray, size: int) -> np.ndarray:
  """ADM's centre crop: halve with a box filter while the short side is >= 2 * size, resize (bicubic) the
  short side to `size`, then cut the centre size x size square. uint8 [H, W, 3] -> [size, size, 3]."""
  im = Image.fromarray(image)
  while min(im.size) >= 2 * size:
    im = im.resize(tuple(s // 2 for s in im.size), resample=Image.BOX)
  scale = size / min(im.size)
  im = im.resize(tuple(round(s * scale) for s in im.size), resample=Image.BICUBIC)
  arr = np.asarray(im)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def crop_size(image_size: int, crop_range: float) -> int:
  """Side of the square the ten crops are cut from, as the release rounds it."""
  return int(image_size * crop_range)


def five_crop_boxes(height: int, width: int, size: int) -> list[tuple[int, int]]:
  """(top, left) of torchvision's five crops: top-left, top-right, bottom-left, bottom-right, centre."""
  # torchvision rounds the centre offset with Python's round (half to even): 25 / 2 -> 12.
  center = (int(round((height - size) / 2.0)), int(round((width - size) / 2.0)))
  return [(0, 0), (0, width - size), (height - size, 0), (height - size, width - size), center]


def ten_crop(image: np.ndarray, size: int) -> np.ndarray:
  """torchvision's TenCrop: the five crops of the image, then the five crops of its mirror image."""
  views = []
  for im in (image, image[:, ::-1]):
    for top, left in five_crop_boxes(im.shape[0], im.shape[1], size):
      views.append(im[top:top + size, left:left + size])
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


def _to_float(images: jax.Array) -> jax.Array:
  return jnp.take(jnp.asarray(PIXEL_VALUES), images.astype(jnp.int32), axis=0)


def _num_threads(n: int) -> int:
  return n if n > 0 else max(1, min(16, os.cpu_count() or 1))


# ---------------------------------------------------------------------------------------------------------
# Image sources.


class ImageSource:
  """One split of an image classification data set: `read(start, stop)` in order, `stream` at random.

  Images come back undecoded where the source allows it (bytes; `to_rgb` decodes), so skipping costs no
  decoding. `random_access` sources also have `get(indices)`.
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
        images, labels = self.get(order[start:start + 256])
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


class TfdsSource(ImageSource):
  """A split of a TFDS builder: random access when it is stored as array_record, slices of the split when
  stored as TFRecord, and one forward pass for ImageFolder (which has neither)."""

  def __init__(self, name: str, builder, split: str, image_key: str, label_key: str):
    import tensorflow_datasets as tfds

    self.name, self.builder, self.split = name, builder, split
    self.image_key, self.label_key = image_key, label_key
    self.num_examples = int(builder.info.splits[split].num_examples)
    self.num_classes = int(builder.info.features[label_key].num_classes)
    self._decoders = {image_key: tfds.decode.SkipDecoding()}
    self._folder = isinstance(builder, tfds.folder_dataset.ImageFolder)
    self.random_access = (not self._folder
                          and str(builder.info.file_format).lower().endswith("array_record"))
    self._source = None
    self._iter, self._pos = None, 0  # ImageFolder's forward pass.

  def _dataset(self, split: str, shuffle: bool = False, seed: int = 0):
    import tensorflow_datasets as tfds

    read_config = tfds.ReadConfig(shuffle_seed=seed) if shuffle else None
    return self.builder.as_dataset(split=split, shuffle_files=shuffle, decoders=self._decoders,
                                   read_config=read_config)

  def _unpack(self, records) -> tuple[list, np.ndarray]:
    return ([r[self.image_key] for r in records],
            np.array([r[self.label_key] for r in records], np.int32).reshape(-1))

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
    if not self._folder:  # TFDS skips whole files and undecoded records to reach a slice.
      return self._unpack(list(tfds.as_numpy(self._dataset(f"{self.split}[{start}:{stop}]"))))
    # ImageFolder: one pass forward; reads before the current position restart it. Skipped files are
    # read from disk but not decoded.
    if self._iter is None or start < self._pos:
      self._iter, self._pos = iter(tfds.as_numpy(self._dataset(self.split))), 0
    for _ in range(start - self._pos):
      next(self._iter)
    records = [next(self._iter) for _ in range(stop - start)]
    self._pos = stop
    return self._unpack(records)

  def stream(self, seed, process_index, process_count):
    import tensorflow_datasets as tfds

    if self.random_access:
      yield from super().stream(seed, process_index, process_count)
      return
    ds = self._dataset(self.split, shuffle=True, seed=seed).shard(process_count, process_index)
    ds = ds.repeat().shuffle(4096, seed=seed)
    for r in tfds.as_numpy(ds):
      yield r[self.image_key], int(r[self.label_key])


def _check_split_name(split: Any, field: str) -> str:
  if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_]+", split):
    raise ValueError(f"{field}={split!r}; expected a plain split name (letters, digits, '_'), e.g. 'train'")
  return split


def open_images(dataset: str, split: str, data_dir: str = "", field: str = "dataset") -> ImageSource:
  """The split `split` of `dataset` ("digits", a TFDS name, a prepared TFDS directory or an image folder).

  `field` names the config field in error messages. Nothing is downloaded: TFDS data sets must be
  prepared beforehand.
  """
  from npp_jax import digits

  split = _check_split_name(split, field.rsplit(".", 1)[0] + ".split")
  if not isinstance(dataset, str) or not dataset:
    raise ValueError(f"{field}={dataset!r}; expected 'digits', a TFDS name or an image folder")
  if dataset == "digits":
    if split not in digits.SPLITS:
      raise ValueError(f"split {split!r} of {field}='digits'; expected one of {digits.SPLITS}")
    images, labels = digits.load_digits(split)
    return ArraySource("digits", float_to_uint8(images), labels, digits.NUM_CLASSES)

  import tensorflow_datasets as tfds

  path = os.path.expanduser(dataset)
  if os.path.isdir(path):
    if os.path.exists(os.path.join(path, "dataset_info.json")):
      builder = tfds.builder_from_directory(path)
    else:
      builder = tfds.folder_dataset.ImageFolder(path)
      if not builder.info.splits:
        raise ValueError(f"{field}={dataset!r} is a folder without <split>/<class>/ image subfolders; "
                         "expected root/<split>/<class>/*.png|jpg or a prepared TFDS directory")
  elif os.sep in dataset or dataset.startswith((".", "~")):
    raise ValueError(f"{field}={dataset!r} does not exist; expected an image folder, a prepared TFDS "
                     "directory, a TFDS name or 'digits'")
  else:
    try:
      builder = tfds.builder(dataset, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
      raise ValueError(f"{field}={dataset!r} is not a TFDS data set, an existing folder or 'digits'; "
                       "expected one of those") from None
    if not builder.is_prepared():
      where = data_dir or "(TFDS default)"
      raise ValueError(f"TFDS data set {dataset!r} is not prepared under data_dir={where!r}; expected it "
                       "built beforehand (`tfds build`; imagenet2012 needs --manual_dir)")
  splits = sorted(builder.info.splits)
  if split not in splits:
    raise ValueError(f"{dataset} has no split {split!r}; expected one of {splits}")
  image_key, label_key = tuple(builder.info.supervised_keys or ("image", "label"))[:2]
  features = builder.info.features
  if image_key not in features or label_key not in features or not hasattr(features[label_key],
                                                                             "num_classes"):
    raise ValueError(f"{dataset} has features {sorted(features)}; expected an image feature and a class "
                     f"label ({image_key!r}, {label_key!r})")
  return TfdsSource(dataset, builder, split, image_key, label_key)


class _Prefetch:
  """Runs an iterator in a background thread, `size` items ahead (host work overlaps device work)."""

  def __init__(self, iterator: Iterator, size: int = 2):
    self._queue: queue.Queue = queue.Queue(maxsize=size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(iterator,), daemon=True)
    self._thread.start()

  def _run(self, iterator):
    try:
      for item in iterator:
        while not self._stop.is_set():
          try:
            self._queue.put((item, None), timeout=0.1)
            break
          except queue.Full:
            pass
        if self._stop.is_set():
          getattr(iterator, "close", lambda: None)()  # Runs the generator's own clean-up.
          return
    except Exception as e:  # Handed to the consumer, which raises it where it waits.
      self._queue.put((None, e))
      return
    self._queue.put((None, StopIteration()))

  def __iter__(self):
    return self

  def __next__(self):
    item, error = self._queue.get()
    if error is not None:
      raise error
    return item

  def close(self):
    self._stop.set()
    self._thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------------------
# Shared checks.


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name}={value!r}; expected a positive integer")
  return int(value)


def _data_parallel(config, batch_size: int, field: str) -> None:
  """The batch must split evenly over the mesh's batch axes and over the processes."""
  shape = sharding.mesh_shape(config.mesh.shape, jax.device_count())
  dp = shape[0] * shape[1]
  if batch_size % dp:
    raise ValueError(f"{field}={batch_size} does not split over the data-parallel size {dp} (mesh "
                     f"{shape}); expected a multiple of {dp}")
  if batch_size % jax.process_count():
    raise ValueError(f"{field}={batch_size}; expected a multiple of the {jax.process_count()} processes")


def _extract_rows(config, batch_size: int) -> tuple[int, int]:
  """(images this process reads per batch, rows it feeds the devices): the rows are padded up to a
  multiple of the process's data-parallel devices, so any batch size works on any mesh."""
  shape = sharding.mesh_shape(config.mesh.shape, jax.device_count())
  dp, procs = shape[0] * shape[1], jax.process_count()
  if batch_size % procs:
    raise ValueError(f"extract.batch_size={batch_size}; expected a multiple of the {procs} processes")
  if dp % procs:
    raise ValueError(f"mesh {shape} has a data-parallel size {dp} that the {procs} processes cannot share; "
                     "expected mesh.shape data x fsdp to be a multiple of the process count")
  local, per = batch_size // procs, dp // procs
  return local, -(-local // per) * per


def check_vq_params(params, vq_config: ml_collections.ConfigDict, where: str) -> None:
  """One-line ValueError unless `params` has the shapes of config.vq's architecture."""
  want = vq.param_shapes(vq_config)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  got = {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(x)) for path, x in flat}
  if got != want:
    first = sorted(set(got) ^ set(want)) or sorted(k for k in want if got[k] != want[k])
    raise ValueError(f"VQ parameters in {where} do not fit config.vq: {first[0]} is "
                     f"{got.get(first[0], 'missing')} there, {want.get(first[0], 'absent')} in the config")


def _gather(x: jax.Array) -> np.ndarray:
  """A batch-sharded global array -> the whole of it on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))




# ---------------------------------------------------------------------------------------------------------
# train_vq.

_USAGE_DECAY = 0.99  # EMA of the code distribution behind the running perplexity (~100 steps).


@flax.struct.dataclass
class VQTrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  code_ema: jax.Array  # [codebook_size] running distribution of the codes chosen.


@dataclasses.dataclass(frozen=True)
class VQHparams:
  """The optimisation settings, hashable: they are static arguments of the compiled step."""
  lr: float
  b1: float
  b2: float
  weight_decay: float
  grad_clip: float
  l1_weight: float
  l2_weight: float
  seed: int

  @classmethod
  def from_config(cls, t: ml_collections.ConfigDict) -> "VQHparams":
    if not isinstance(t.lr, (int, float)) or not t.lr > 0:
      raise ValueError(f"vq_train.lr={t.lr!r}; expected a positive number")
    for name in ("b1", "b2"):
      if not isinstance(t[name], (int, float)) or not 0.0 <= t[name] < 1.0:
        raise ValueError(f"vq_train.{name}={t[name]!r}; expected a number in [0, 1)")
    for name in ("weight_decay", "grad_clip", "l1_weight", "l2_weight"):
      if not isinstance(t[name], (int, float)) or t[name] < 0:
        raise ValueError(f"vq_train.{name}={t[name]!r}; expected a number >= 0")
    if t.l1_weight == 0 and t.l2_weight == 0:
      raise ValueError("vq_train.l1_weight and vq_train.l2_weight are both 0; expected a reconstruction "
                       "loss (l2_weight=1 is the release's)")
    return cls(lr=float(t.lr), b1=float(t.b1), b2=float(t.b2), weight_decay=float(t.weight_decay),
               grad_clip=float(t.grad_clip), l1_weight=float(t.l1_weight), l2_weight=float(t.l2_weight),
               seed=int(t.seed))


def make_vq_optimizer(hp: VQHparams) -> optax.GradientTransformation:
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  return optax.chain(
      optax.clip_by_global_norm(hp.grad_clip) if hp.grad_clip > 0 else optax.identity(),
      optax.adamw(hp.lr, b1=hp.b1, b2=hp.b2, weight_decay=hp.weight_decay, mask=decay_mask))


def _init_vq_state(rng, *, cfg: vq.VQConfig, hp: VQHparams) -> VQTrainState:
  # Shapes of parameters do not depend on the image size: the smallest image keeps the init cheap.
  f = cfg.downsample
  params = vq.VQModel(cfg).init(rng, jnp.zeros((1, f, f, 3)))["params"]
  return VQTrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=make_vq_optimizer(hp).init(params),
                      code_ema=jnp.zeros((cfg.codebook_size,), jnp.float32))


def _perplexity(p: jax.Array) -> jax.Array:
  p = p / jnp.maximum(p.sum(), 1e-12)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def vq_train_step(state: VQTrainState, images: jax.Array, *, cfg: vq.VQConfig, hp: VQHparams):
  """One AdamW step on uint8 images [B, S, S, 3]; returns (state, metrics)."""
  x = _to_float(images)
  rng = jax.random.fold_in(jax.random.key(hp.seed), state.step)

  def loss_fn(params):
    rec, codes, q = vq.VQModel(cfg).apply({"params": params}, x, train=True, rngs={"dropout": rng})
    diff = rec - x
    terms = {"rec_l2": jnp.mean(diff * diff), "rec_l1": jnp.mean(jnp.abs(diff)),
             "codebook": q["codebook"], "commitment": q["commitment"], "entropy": q["entropy"]}
    loss = hp.l2_weight * terms["rec_l2"] + hp.l1_weight * terms["rec_l1"] + q["quantizer"]
    return loss, (codes, terms)

  (loss, (codes, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = make_vq_optimizer(hp).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  counts = jnp.zeros((cfg.codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
  p = counts / counts.sum()
  code_ema = jnp.where(state.step == 0, p, _USAGE_DECAY * state.code_ema + (1.0 - _USAGE_DECAY) * p)
  metrics = {"loss": loss, **terms, "grad_norm": optax.global_norm(grads),
             "usage_batch": jnp.mean((counts > 0).astype(jnp.float32)),  # Fraction of the codebook used.
             "perplexity_batch": _perplexity(p), "perplexity_running": _perplexity(code_ema)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, code_ema=code_ema), metrics


@functools.lru_cache(maxsize=8)
def _vq_functions(cfg: vq.VQConfig, hp: VQHparams, mesh):
  """(init, step) compiled for a mesh; cached so repeated jobs in one process compile once."""
  rep, batch = NamedSharding(mesh, P()), sharding.data_sharding(mesh)
  init = jax.jit(functools.partial(_init_vq_state, cfg=cfg, hp=hp), out_shardings=rep)
  step = jax.jit(functools.partial(vq_train_step, cfg=cfg, hp=hp), in_shardings=(rep, batch),
                 out_shardings=(rep, rep), donate_argnums=0)
  return init, step


def _vq_batches(source: ImageSource, image_size: int, local: int, seed: int, start_step: int,
                random_flip: bool, threads: int) -> Iterator[np.ndarray]:
  """uint8 [local, S, S, 3] per step: this process's rows of the global batch.

  Random-access sources draw batch s from a generator seeded by (seed, s), so a resumed run sees the
  batches it would have seen; streamed sources reshuffle with a seed that includes the resume step.
  """
  p, n_proc = jax.process_index(), jax.process_count()
  pool = concurrent.futures.ThreadPoolExecutor(threads)

  def prepare(images, flips):
    def one(args):
      image, flip = args
      x = center_crop_arr(to_rgb(image), image_size)
      return x[:, ::-1] if flip else x
    return np.stack(list(pool.map(one, zip(images, flips))))

  try:
    if source.random_access:
      step = start_step
      while True:
        rng = np.random.default_rng([seed, step])
        idx = rng.choice(source.num_examples, size=local * n_proc,
                         replace=source.num_examples < local * n_proc)
        flips = (rng.random(local * n_proc) < 0.5) & random_flip
        rows = slice(p * local, (p + 1) * local)
        images, _ = source.get(idx[rows])
        yield prepare(images, flips[rows])
        step += 1
    else:
      stream = source.stream(seed + 1_000_003 * start_step, p, n_proc)
      rng = np.random.default_rng([seed, start_step, p])
      while True:
        images = [next(stream)[0] for _ in range(local)]
        yield prepare(images, (rng.random(local) < 0.5) & random_flip)
  finally:
    pool.shutdown(wait=False)


def train_vq(config: ml_collections.ConfigDict, workdir: str) -> Optional[str]:
  """Train a VQ tokenizer of config.vq's architecture on images; returns WORKDIR/vq (its final params),
  or None when a SIGTERM stopped it early (after saving a checkpoint to resume from).

  Losses: l2_weight * MSE + l1_weight * MAE of the reconstruction, plus the quantizer's codebook and
  commitment terms (and its entropy term when vq.entropy_loss_ratio > 0). LlamaGen's perceptual (LPIPS)
  and adversarial (PatchGAN) losses are NOT included: reconstructions are blurrier than the release's
  VQ-16, which is fine for small data (the demo's digits) and as a starting point elsewhere.

  Data parallel over the mesh's batch axes (parameters replicated). Logs losses, codebook usage in the
  batch and a running perplexity (npp_jax.summaries); orbax checkpoints under WORKDIR/vq_checkpoints (keep
  vq_train.keep_checkpoints; a re-run resumes from the latest; SIGTERM saves and stops). At the end the
  parameters go to WORKDIR/vq in npp_jax.convert's layout (what extract and the sampler read); when that
  exists already, nothing is trained again.
  """
  from npp_jax import summaries



  # --- validate: nothing is compiled or written before this passes.
  t = config.vq_train
  cfg = vq.VQConfig.from_config(config.vq)
  hp = VQHparams.from_config(t)
  for name in ("steps", "batch_size", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
    _positive_int(t[name], f"vq_train.{name}")
  _data_parallel(config, t.batch_size, "vq_train.batch_size")
  final_dir = os.path.join(workdir, "vq")
  if os.path.exists(final_dir):
    check_vq_params(checkpoints.read_params(final_dir), config.vq, final_dir)
    logging.info("VQ already trained: %s holds its final parameters; not training again.", final_dir)
    return final_dir
  source = open_images(t.dataset, t.split, t.data_dir, "vq_train.dataset")
  ckpt_dir = os.path.join(workdir, "vq_checkpoints")
  arch = checkpoints.architecture(config.vq, checkpoints.VQ_ARCH_FIELDS)
  if os.path.isdir(ckpt_dir):
    checkpoints.Checkpointer(ckpt_dir, keep=t.keep_checkpoints, architecture=arch).check_architecture()

  # --- mesh, state (replicated: a VQ is small), checkpoint.
  mesh = sharding.make_mesh(config.mesh)
  init_fn, step_fn = _vq_functions(cfg, hp, mesh)
  rng = jax.random.key(hp.seed)
  ckpt = checkpoints.Checkpointer(ckpt_dir, keep=t.keep_checkpoints, architecture=arch)
  start = 0
  if ckpt.latest_step() is not None:
    rep = NamedSharding(mesh, P())
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            jax.eval_shape(init_fn, rng))
    state, _, start = ckpt.restore(abstract)
    logging.info("Resumed VQ training from step %d in %s.", start, ckpt_dir)
  else:
    state = init_fn(rng)
  logging.info("VQ %s: %.2fM parameters, %dx%d images -> %dx%d codes of %d; %s split %s (%d images).",
               cfg.ch_mult, vq.count_params(cfg) / 1e6, cfg.image_size, cfg.image_size, *cfg.grid,
               cfg.codebook_size, source.name, t.split, source.num_examples)

  # --- logging and data.
  is_main = jax.process_index() == 0
  writer = summaries.create_default_writer(workdir, just_logging=not is_main)
  if start == 0 and is_main:
    writer.write_hparams({f"vq.{k}": str(v) for k, v in config.vq.items()}
                         | {f"vq_train.{k}": v if isinstance(v, (int, float, str, bool)) else str(v)
                            for k, v in t.items()})
  report = summaries.ReportProgress(num_train_steps=t.steps, writer=writer)
  local = t.batch_size // jax.process_count()
  batches = _Prefetch(_vq_batches(source, cfg.image_size, local, hp.seed, start, t.random_flip,
                                  _num_threads(t.num_threads)))

  # --- loop.
  step, t_log, step_log = start, time.perf_counter(), start
  try:
    with checkpoints.Preemption() as preempt:
      pending = None
      while step < t.steps:
        images = sharding.global_batch({"images": next(batches)}, mesh)["images"]
        if pending is not None:  # At most two steps in flight: the host cannot queue up batches.
          pending.block_until_ready()
        state, metrics = step_fn(state, images)
        pending = metrics["loss"]
        step += 1
        report(step)
        if step % t.log_every_steps == 0 or step == t.steps:
          metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
          if not all(np.isfinite(v) for v in metrics.values()):
            raise FloatingPointError(f"non-finite VQ metrics at step {step}: {metrics}; stopped without "
                                     f"saving, the last checkpoint is step {ckpt.latest_step()}")
          now = time.perf_counter()
          metrics["step_s"] = (now - t_log) / (step - step_log)
          t_log, step_log = now, step
          writer.write_scalars(step, metrics)
        stop = preempt.requested or ckpt.reached_preemption(step)
        if stop:
          logging.warning("Preemption requested: saving VQ step %d and stopping.", step)
        if stop or step % t.checkpoint_every_steps == 0 or step == t.steps:
          ckpt.save(step, state, force=True)
        if stop:
          break
  finally:
    batches.close()
    ckpt.close()
    writer.flush()
  if step < t.steps:
    return None  # Stopped by SIGTERM after saving: the same command resumes.
  checkpoints.save_params(final_dir, jax.device_get(state.params))
  logging.info("VQ trained for %d steps; final parameters in %s.", step, final_dir)
  return final_dir


# ---------------------------------------------------------------------------------------------------------
# extract.


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode_uint8(params, images: jax.Array, cfg: vq.VQConfig) -> jax.Array:
  """uint8 images [B, S, S, 3] -> codes [B, h, w] int32, pixels mapped to [-1, 1] as the release."""
  codes, _, _ = vq.VQModel(cfg).apply({"params": params}, _to_float(images), method=vq.VQModel.encode)
  return codes


def encode_views(params, views: np.ndarray, cfg: vq.VQConfig, mesh) -> np.ndarray:
  """This process's uint8 views [L, n_aug, S, S, 3] -> codes [P * L, n_aug, h, w] of all processes' rows.

  One view index at a time, so memory follows the batch size, not batch size x n_aug.
  """
  batch = sharding.data_sharding(mesh)
  codes = [encode_uint8(params, jax.make_array_from_process_local_data(
      batch, np.ascontiguousarray(views[:, a])), cfg) for a in range(views.shape[1])]
  return _gather(jnp.stack(codes, axis=1))


def _extract_settings(e, cfg: vq.VQConfig, source: ImageSource) -> dict:
  return {"dataset": source.name, "data_dir": e.data_dir, "split": e.split, "aug": e.aug,
          "crop_range": float(e.crop_range) if e.aug == "tencrop" else None, "batch_size": e.batch_size,
          "image_size": cfg.image_size, "codebook_size": cfg.codebook_size,
          "vq_checkpoint": os.path.abspath(e.vq_checkpoint), "num_examples": source.num_examples}


def _existing_dataset(output: str) -> Optional[dict]:
  meta_path = os.path.join(output, "code_dataset.json")  # npp_jax.data's record of finished splits.
  if not os.path.exists(meta_path):
    return None
  with open(meta_path) as f:
    return json.load(f)


def extract(config: ml_collections.ConfigDict, workdir: str, source: Optional[ImageSource] = None) -> dict:
  """Encode one split of images into a code data set (npp_jax.data) with the release's augmentations.

  Each global batch of extract.batch_size images becomes a shard WORKDIR/extract_tmp/<split>/shard_*.npz
  (written atomically by process 0) as soon as it is encoded; a re-run encodes only missing shards, then
  streams them into the data set at extract.output (default WORKDIR/codes). A split that is already
  finished there is left alone. Every process reads and encodes its rows of each batch; codes are gathered
  to process 0, which writes. Returns a summary (examples, shards encoded and reused, images/s).

  `source` replaces opening extract.dataset (benchmarks, notebooks with images in memory).
  """
  from tqdm import tqdm

  # --- validate: nothing is compiled or written before this passes.
  e = config.extract
  cfg = vq.VQConfig.from_config(config.vq)
  if e.aug not in AUGS:
    raise ValueError(f"extract.aug={e.aug!r}; expected one of {sorted(AUGS)}")
  if e.aug == "tencrop" and (not isinstance(e.crop_range, (int, float)) or not 1.0 <= e.crop_range <= 2.0):
    raise ValueError(f"extract.crop_range={e.crop_range!r}; expected a number in [1, 2] (the release: 1.1 "
                     "or 1.05)")
  n_aug = AUGS[e.aug]
  batch_size = _positive_int(e.batch_size, "extract.batch_size")
  model_grid = tuple(int(g) for g in config.model.grid)
  if cfg.grid != model_grid:
    raise ValueError(f"vq.image_size={cfg.image_size} with downsampling {cfg.downsample} gives "
                     f"{cfg.grid[0]}x{cfg.grid[1]} codes but model.grid={model_grid}; expected the same grid")
  if cfg.codebook_size != config.model.vocab_size:
    raise ValueError(f"vq.codebook_size={cfg.codebook_size} but model.vocab_size={config.model.vocab_size}; "
                     "expected the tokenizer's codebook size")
  if not e.vq_checkpoint:
    raise ValueError("extract.vq_checkpoint is empty; expected a VQ checkpoint directory (npp_jax.convert "
                     "--kind=vq, or --mode=train_vq's WORKDIR/vq)")
  if not os.path.isdir(e.vq_checkpoint):
    raise ValueError(f"extract.vq_checkpoint={e.vq_checkpoint!r} does not exist; expected a VQ checkpoint "
                     "directory (npp_jax.convert --kind=vq, or --mode=train_vq's WORKDIR/vq)")
  split = _check_split_name(e.split, "extract.split")
  local, device_rows = _extract_rows(config, batch_size)
  output = e.output or os.path.join(workdir, "codes")
  summary = {"output": output, "split": split, "n_aug": n_aug, "shards_encoded": 0, "shards_reused": 0}
  existing = _existing_dataset(output)
  if existing is not None:
    finished = existing.get("splits", {}).get(split)
    if finished:
      logging.info("Split %r of %s already exists (%d examples); nothing to extract.", split, output,
                   finished["num_examples"])
      print(f"extract: split '{split}' of {output} already exists; skipping", flush=True)
      return {**summary, "num_examples": finished["num_examples"], "skipped": True}
    want = {"grid": list(cfg.grid), "n_aug": n_aug, "vocab_size": cfg.codebook_size,
            "num_classes": config.model.num_classes}
    diff = [f"{k}={existing.get(k)} there, {v} now" for k, v in want.items() if existing.get(k) != v]
    if diff:
      raise ValueError(f"code data set {output} was made with other settings ({'; '.join(diff)}); expected "
                       "the same, or another extract.output")
  if source is None:
    source = open_images(e.dataset, split, e.data_dir, "extract.dataset")
  if source.num_classes > config.model.num_classes:
    raise ValueError(f"{source.name} has {source.num_classes} classes; expected at most "
                     f"model.num_classes={config.model.num_classes}")
  params = checkpoints.read_params(e.vq_checkpoint)
  check_vq_params(params, config.vq, e.vq_checkpoint)
  tmp_dir = os.path.join(workdir, "extract_tmp", split)
  settings = _extract_settings(e, cfg, source)
  settings_path = os.path.join(tmp_dir, "settings.json")
  files.check_same_settings(settings_path, settings, tmp_dir, "shards",
                            f"expected the same settings, or delete {tmp_dir}")

  # --- which shards are left.
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh)
  n = source.num_examples
  num_shards = -(-n // batch_size)
  width = max(6, len(str(num_shards)))
  shard_path = lambda i: os.path.join(tmp_dir, f"shard_{i:0{width}d}.npz")
  done = np.array([os.path.exists(shard_path(i)) for i in range(num_shards)])
  if jax.process_count() > 1:  # Process 0's view of the files decides, so every process agrees.
    from jax.experimental import multihost_utils

    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  todo = [i for i in range(num_shards) if not done[i]]
  if is_main:
    os.makedirs(tmp_dir, exist_ok=True)
    files.write_json(settings_path, settings)
  logging.info("Extracting %s split %r: %d images x %d views (%s), %d shards of %d, %d already done.",
               source.name, split, n, n_aug, e.aug, num_shards, batch_size, num_shards - len(todo))

  # --- encode: host preparation of the next shard overlaps the device work on this one.
  params = jax.device_put(params, NamedSharding(mesh, P()))
  pool = concurrent.futures.ThreadPoolExecutor(_num_threads(e.num_threads))
  reader = concurrent.futures.ThreadPoolExecutor(1)  # Sources read in order, one batch at a time.
  size = cfg.image_size

  def prepare(i: int):
    start = i * batch_size + jax.process_index() * local
    stop = min(start + local, n)
    views = np.zeros((device_rows, n_aug, size, size, 3), np.uint8)  # Rows past the end: padding.
    labels = np.zeros((device_rows,), np.int32)
    if stop > start:
      images, got = source.read(start, stop)
      views[:stop - start] = np.stack(list(pool.map(
          lambda im: augment(to_rgb(im), e.aug, size, e.crop_range), images)))
      labels[:stop - start] = got
    return views, labels

  code_dtype = np.uint16 if cfg.codebook_size <= 2**16 else np.int32
  done_images = sum(min((i + 1) * batch_size, n) - i * batch_size for i in range(num_shards) if done[i])
  bar = tqdm(total=n, initial=done_images, unit="img", desc=f"extract {split}", disable=not is_main,
             smoothing=0.3)
  t0, encoded = time.perf_counter(), 0
  try:
    pending = reader.submit(prepare, todo[0]) if todo else None
    for j, i in enumerate(todo):
      views, labels = pending.result()
      if j + 1 < len(todo):
        pending = reader.submit(prepare, todo[j + 1])
      codes = encode_views(params, views, cfg, mesh)
      if jax.process_count() > 1:
        labels = _gather(jax.make_array_from_process_local_data(sharding.data_sharding(mesh), labels))
      # Gathered rows are [process 0's device_rows, process 1's, ...]: drop each one's padding.
      unpad = lambda x: x.reshape(-1, device_rows, *x.shape[1:])[:, :local].reshape(-1, *x.shape[1:])
      codes, labels = unpad(codes), unpad(labels)
      count = min((i + 1) * batch_size, n) - i * batch_size
      if is_main:
        files.atomic_write(shard_path(i), lambda f: np.savez(f, codes=codes[:count].astype(code_dtype),
                                                              labels=labels[:count]))
      encoded += count
      summary["shards_encoded"] += 1
      bar.update(count)
  finally:
    bar.close()
    reader.shutdown(wait=True, cancel_futures=True)
    pool.shutdown(wait=True)
  elapsed = time.perf_counter() - t0
  summary["shards_reused"] = num_shards - len(todo)
  summary["images_per_s"] = encoded / elapsed if encoded else None
  if encoded:
    logging.info("Encoded %d images (%d views each) in %.1f s: %.1f images/s.", encoded, n_aug, elapsed,
                 encoded / elapsed)

  # --- the code data set, from the shards in order.
  if is_main:
    with data.CodeDatasetWriter(output, cfg.grid, n_aug, cfg.codebook_size, config.model.num_classes,
                                split=split, overwrite=True) as writer:  # Replaces only an unfinished split.
      for i in range(num_shards):
        with np.load(shard_path(i)) as z:
          writer.add(z["codes"], z["labels"])
    if not e.keep_shards:
      shutil.rmtree(tmp_dir)
      if not os.listdir(os.path.dirname(tmp_dir)):
        os.rmdir(os.path.dirname(tmp_dir))
    logging.info("Wrote split %r of %s: %d examples, %d views each.", split, output, n, n_aug)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("npp_jax.tokenizer.extract")
  return {**summary, "num_examples": n, "skipped": False}
