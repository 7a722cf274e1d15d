"""Code extraction speed of the demo's VQ on this machine; prints one JSON line.

    python benchmarks/extract.py [--aug=tencrop|flip|none] [--images=1024] [--batch_size=256]

Runs the real job (npp_jax.jobs.extract.run: host crops on grain's threads overlapping the jitted
encoder, shard files, the final code data set) on random 32x32 uint8 images held in memory, with the
demo's VQ (configs/demo.py's vq) at random weights. A first run on one batch compiles the encoder;
the timed run reuses it, so compile time is excluded. images_per_s counts source images (each
encoded as n_aug views); views_per_s counts encoder inputs. The machine is shared: load_avg_1m says
how busy it was.

Measured (2-core AMD EPYC shared with other jobs, load ~3.6; 1 CPU device, fp32, demo VQ, 1024
images, batch 256): tencrop 67 images/s (669 views/s), none 607 images/s: the encoder, not the
crops, sets the pace (a view costs the same with or without ten-crop).
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

from npp_jax import checkpoints
from npp_jax import config_lib
from npp_jax.data import images as images_lib
from npp_jax.jobs import extract
from npp_jax.models import vq

FLAGS = flags.FLAGS
flags.DEFINE_enum(
  "aug", "tencrop", sorted(images_lib.AUGS), "Views per image: the release's ten-crop, etc."
)
flags.DEFINE_integer("images", 1024, "Images in the timed run.")
flags.DEFINE_integer("batch_size", 256, "extract.batch_size: images per step and per shard.")


def main(_):
  config = config_lib.load("configs/demo.py")
  config.extract.aug = FLAGS.aug
  config.extract.batch_size = FLAGS.batch_size
  cfg = vq.VQConfig.from_config(config.vq)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.images, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, config.model.num_classes, FLAGS.images)
  with tempfile.TemporaryDirectory() as tmp:
    params = jax.jit(vq.init_params, static_argnums=0)(cfg, jax.random.key(0))
    config.extract.vq_checkpoint = os.path.join(tmp, "vq")
    checkpoints.save_params(config.extract.vq_checkpoint, jax.device_get(params))
    n = FLAGS.batch_size
    warm = images_lib.ArraySource("random", images[:n], labels[:n], config.model.num_classes)
    t0 = time.perf_counter()
    extract.run(config, os.path.join(tmp, "warmup"), source=warm)
    first = time.perf_counter() - t0
    source = images_lib.ArraySource("random", images, labels, config.model.num_classes)
    t0 = time.perf_counter()
    out = extract.run(config, os.path.join(tmp, "timed"), source=source).outputs
    total = time.perf_counter() - t0
  n_aug = images_lib.AUGS[FLAGS.aug]
  result = {
    "benchmark": "extract",
    "images_per_s": round(out["images_per_s"], 1),
    "views_per_s": round(out["images_per_s"] * n_aug, 1),
    "images_per_s_with_writing": round(FLAGS.images / total, 1),
    "compile_s_approx": round(max(first - n / out["images_per_s"], 0.0), 2),
    "aug": FLAGS.aug,
    "n_aug": n_aug,
    "images": FLAGS.images,
    "batch_size": FLAGS.batch_size,
    "vq": {
      "ch": cfg.ch,
      "ch_mult": list(cfg.ch_mult),
      "num_res_blocks": cfg.num_res_blocks,
      "z_channels": cfg.z_channels,
      "codebook": [cfg.codebook_size, cfg.codebook_embed_dim],
      "image_size": cfg.image_size,
      "params_m": round(vq.count_params(cfg) / 1e6, 3),
      "dtype": config.vq.dtype,
    },
    "device": machine.describe(),
    "devices": jax.device_count(),
    "jax": jax.__version__,
    "load_avg_1m": round(os.getloadavg()[0], 2),
    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
  }
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  app.run(main)
