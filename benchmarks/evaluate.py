"""Feature extraction speed of --mode=evaluate (FID Inception-v3 at 299 px); prints one JSON line.

    python benchmarks/evaluate.py [--images=64] [--batch_size=32] [--size=256] [--preprocess=adm]

Runs the job's own loop (npp_jax.features.compute_features: slices of an ADM npz read from disk, the
resize to 299 px and the network jitted over all devices, one cached shard file per batch) on random
uint8 images with random weights. A first call on one batch compiles; the timed call reuses the
compiled function, so compile time is excluded. The machine may be shared: load_avg_1m says how busy
it was.
"""

import datetime
import json
import os
import tempfile
import time

from absl import app
from absl import flags
from etils import epath
import jax
import machine  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)
import numpy as np

from npp_jax import config_lib
from npp_jax import sharding
from npp_jax.fid import features
from npp_jax.fid import images as image_sets
from npp_jax.models import inception

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 64, "Images in the timed run.")
flags.DEFINE_integer("batch_size", 32, "evaluate.batch_size: global images per step and per shard.")
flags.DEFINE_integer("size", 256, "Side of the input images (resized to 299 px by the job).")
flags.DEFINE_enum("preprocess", "adm", list(inception.PREPROCESS), "evaluate.preprocess.")


def random_params(seed: int = 0):
  """He-scaled random weights with the release file's shapes (BN statistics near identity)."""
  rng = np.random.default_rng(seed)
  tree = {}
  for path, shape in inception.param_shapes().items():
    leaf = path.rsplit("/", 1)[1]
    if leaf == "kernel":
      x = rng.normal(0, np.sqrt(2.0 / np.prod(shape[:-1])), shape)
    else:
      x = np.ones(shape) if leaf in ("bn_scale", "bn_var") else np.zeros(shape)
    node = tree
    *modules, leaf = path.split("/")
    for m in modules:
      node = node.setdefault(m, {})
    node[leaf] = x.astype(np.float32)
  return tree


def main(_):
  config = config_lib.load("configs/tiny.py")
  e = config.evaluate
  e.batch_size, e.preprocess = FLAGS.batch_size, FLAGS.preprocess
  mesh = sharding.make_mesh(config.mesh)
  params = random_params()
  rng = np.random.default_rng(0)
  with tempfile.TemporaryDirectory() as tmp:
    path = epath.Path(tmp) / "samples.npz"
    np.savez(
      path, arr_0=rng.integers(0, 256, (FLAGS.images, FLAGS.size, FLAGS.size, 3), dtype=np.uint8)
    )
    images = image_sets.open_npz_images(path, "samples")
    warm = image_sets.NpzImages(path, (FLAGS.batch_size, *images.shape[1:]))
    t0 = time.perf_counter()
    features.compute_features(
      warm, params, mesh, e, epath.Path(tmp) / "warm", {"run": "warm"}, "warmup"
    )
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    pool3, _ = features.compute_features(
      images, params, mesh, e, epath.Path(tmp) / "timed", {"run": "timed"}, "timed"
    )
    total = time.perf_counter() - t0
  assert pool3.shape == (FLAGS.images, 2048) and np.isfinite(pool3).all()
  print(
    json.dumps(
      {
        "benchmark": "evaluate_features",
        "machine": machine.describe(),
        "devices": jax.device_count(),
        "date": datetime.date.today().isoformat(),
        "images": FLAGS.images,
        "batch_size": FLAGS.batch_size,
        "input_px": FLAGS.size,
        "network_px": inception.IMAGE_SIZE,
        "preprocess": FLAGS.preprocess,
        "images_per_s": round(FLAGS.images / total, 2),
        "first_batch_incl_compile_s": round(first, 1),
        "minutes_per_50k": round(50000 / (FLAGS.images / total) / 60, 1),
        "load_avg_1m": round(os.getloadavg()[0], 2),
      }
    )
  )


if __name__ == "__main__":
  app.run(main)
