"""Sampling speed of GPT-B with guidance on this machine; prints one JSON line.

    python benchmarks/sample.py [--dtype=float32|bfloat16] [--repeats=2]

Weights are a random init with a random (non-zero) output layer, so the sampled tokens vary as they
do with trained weights. Times are the fastest of --repeats warm runs; compile_s is the first call
minus a warm one. The PyTorch release takes 28.6 s for 4 images at grid 16 with guidance on this
kind of CPU (NPP.md). The machine is shared: load_avg_1m says how busy it was.

Measured (2-core AMD EPYC, idle): fp32 5.2 s for 4 images (5.5x the release), 1.05 images/s at grid
16 and
0.40 at grid 24 (8 images); bf16 weights and compute 7.3 s for 4 images, so sampling runs in fp32 on
CPU.
"""

import dataclasses
import datetime
import json
import os
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import machine  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)
import numpy as np

from npp_jax import config_lib
from npp_jax import sampling
from npp_jax.models import gpt

FLAGS = flags.FLAGS
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype.")
flags.DEFINE_integer("repeats", 2, "Timed runs per setting; the fastest is reported.")
flags.DEFINE_float("cfg_scale", 2.0, "Guidance scale (GPT-B's, NPP.md).")


def random_params(cfg: gpt.GPTConfig, dtype):
  model = gpt.GPT(cfg)
  h, w = cfg.grid
  params = jax.jit(
    lambda: nn.unbox(
      model.init(jax.random.key(0), jnp.zeros((1, h, w), jnp.int32), jnp.zeros((1,), jnp.int32))[
        "params"
      ]
    )
  )()
  kernel = params["output"]["kernel"]
  params["output"]["kernel"] = 0.02 * jax.random.normal(
    jax.random.key(1), kernel.shape, kernel.dtype
  )
  return jax.tree.map(lambda x: x.astype(dtype), params)


def time_sampler(params, cfg, n_images):
  labels = jnp.arange(n_images, dtype=jnp.int32) % cfg.num_classes
  kw = dict(model=cfg, settings=sampling.SamplingSettings(cfg_scale=FLAGS.cfg_scale))
  t0 = time.perf_counter()
  jax.block_until_ready(sampling.sample_codes(params, labels, jax.random.key(0), **kw))
  first = time.perf_counter() - t0
  best = float("inf")
  for r in range(FLAGS.repeats):
    t0 = time.perf_counter()
    codes = jax.block_until_ready(
      sampling.sample_codes(params, labels, jax.random.key(r + 1), **kw)
    )
    best = min(best, time.perf_counter() - t0)
  assert len(np.unique(np.asarray(codes))) > 1, "degenerate samples"
  return best, max(first - best, 0.0)


def main(_):
  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[FLAGS.dtype]
  out = {}
  compile_s = {}
  for grid, n_images, key in (
    (16, 8, "images_per_s_grid16"),
    (24, 8, "images_per_s_grid24"),
    (16, 4, "s_4images_grid16"),
  ):
    m = config_lib.model_config("GPT-B")
    m.grid = (grid, grid)
    cfg = dataclasses.replace(gpt.GPTConfig.from_config(m), dtype=dtype, param_dtype=dtype)
    params = random_params(cfg, dtype)
    seconds, compile_s[f"grid{grid}_{n_images}images"] = time_sampler(params, cfg, n_images)
    out[key] = round(n_images / seconds, 3) if key.startswith("images") else round(seconds, 2)
  out.update(
    compile_s={k: round(v, 1) for k, v in compile_s.items()},
    dtype=FLAGS.dtype,
    cfg_scale=FLAGS.cfg_scale,
    device=machine.describe(),
    load_avg_1m=round(os.getloadavg()[0], 2),
    date=datetime.date.today().isoformat(),
  )
  print(json.dumps(out))


if __name__ == "__main__":
  app.run(main)
