"""Ten-crop extraction from an image folder (ImageNet as it lies on disk); prints one JSON line.

    python benchmarks/extract_folder.py [--images=512] [--size=500x375] [--config=configs/demo.py]

Writes `--images` JPEGs (quality 90, `--size` pixels: ImageNet's typical 500x375 by default, smooth
random content so that they compress as photos do) into class folders, then times, each after a
warm-up on one batch:
  * reading: the folder opened (every file's header checked) and each image decoded by PIL
    (.convert("RGB")) and cut into the release's ten crops on grain's threads, as the job does,
    without the encoder: the host side's ceiling.
  * extraction: the real job (npp_jax.jobs.extract) on the folder, with the config's VQ at random
    weights; compile time excluded (the warm-up compiles).
images_per_s counts source images. The VQ and crop size are the config's (configs/demo.py: 32 px);
a 256 px config (configs/b.py) times the release's crops and encoder. load_avg_1m says how busy the
machine was: time on an idle machine.
"""

import datetime
import json
import os
import tempfile
import time

from absl import app
from absl import flags
import jax
import machine  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)
import numpy as np
from PIL import Image

from npp_jax import checkpoints
from npp_jax import config_lib
from npp_jax.data import images as images_lib
from npp_jax.jobs import extract
from npp_jax.models import vq

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 512, "Images in each timed run.")
flags.DEFINE_string("size", "500x375", "Width x height of the JPEGs.")
flags.DEFINE_integer("classes", 8, "Class folders the images are spread over.")
flags.DEFINE_integer("batch_size", 128, "extract.batch_size: images per step and per shard.")
flags.DEFINE_string("config", "configs/demo.py", "The config whose VQ encodes (config.vq).")


def write_folder(root: str, n: int, size: tuple[int, int], classes: int, seed: int) -> None:
  """n JPEGs in root/c<k>/: low-frequency noise upsampled, so that files have photo-like sizes."""
  rng = np.random.default_rng(seed)
  w, h = size
  for i in range(n):
    small = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    im = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    folder = os.path.join(root, f"c{i % classes}")
    os.makedirs(folder, exist_ok=True)
    im.save(os.path.join(folder, f"{i:06d}.JPEG"), quality=90)


def read_only(root: str, config) -> float:
  """Images/s of opening the folder and preparing every image's views as extraction does."""
  e, size = config.extract, config.vq.image_size
  threads = images_lib.num_threads(e.num_threads)
  t0 = time.perf_counter()
  source = images_lib.open_images(root, "train")
  for start in range(0, source.num_examples, e.batch_size):
    paths, _ = source.read(start, min(start + e.batch_size, source.num_examples))
    images_lib.parallel_map(
      lambda p: images_lib.augment(images_lib.to_rgb(p), e.aug, size, e.crop_range), paths, threads
    )
  return source.num_examples / (time.perf_counter() - t0)


def main(_):
  config = config_lib.load(FLAGS.config)
  config.extract.aug = "tencrop"
  config.extract.batch_size = FLAGS.batch_size
  cfg = vq.VQConfig.from_config(config.vq)
  size = tuple(int(s) for s in FLAGS.size.split("x"))
  with tempfile.TemporaryDirectory() as tmp:
    warm, timed = os.path.join(tmp, "warm"), os.path.join(tmp, "timed")
    write_folder(warm, FLAGS.batch_size, size, FLAGS.classes, seed=0)
    write_folder(timed, FLAGS.images, size, FLAGS.classes, seed=1)
    params = jax.jit(vq.init_params, static_argnums=0)(cfg, jax.random.key(0))
    config.extract.vq_checkpoint = os.path.join(tmp, "vq")
    checkpoints.save_params(config.extract.vq_checkpoint, jax.device_get(params))
    read_only(warm, config)  # Page cache and grain's threads warm for both runs.
    reading = read_only(timed, config)
    config.extract.dataset = warm
    extract.extract(config, os.path.join(tmp, "w_warm"))  # Compiles the encoder.
    config.extract.dataset = timed
    t0 = time.perf_counter()
    out = extract.extract(config, os.path.join(tmp, "w_timed"))
    total = time.perf_counter() - t0
  result = {
    "benchmark": "extract_folder",
    "reading_images_per_s": round(reading, 1),
    "extract_images_per_s": round(out["images_per_s"], 1),
    "extract_images_per_s_with_writing": round(FLAGS.images / total, 1),
    "aug": "tencrop",
    "images": FLAGS.images,
    "jpeg_size": list(size),
    "crop_px": cfg.image_size,
    "batch_size": FLAGS.batch_size,
    "threads": images_lib.num_threads(config.extract.num_threads),
    "config": FLAGS.config,
    "vq_params_m": round(vq.count_params(cfg) / 1e6, 3),
    "device": machine.describe(),
    "devices": jax.device_count(),
    "jax": jax.__version__,
    "load_avg_1m": round(os.getloadavg()[0], 2),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
  }
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
