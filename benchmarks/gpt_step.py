"""The GPT train step as the benchmarks build and time it: a random class batch, the trainer's
optimizer and state (npp_jax.train_step), one compiled step per k, the median of timed steps."""

import functools
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from npp_jax import npp
from npp_jax import train_step
from npp_jax.models import gpt


def setup(config, batch_size: int):
  """(model, schedule, tx, lr_fn, state, batch) for config.model at `batch_size` random images."""
  cfg = gpt.GPTConfig.from_config(config.model)
  model = gpt.GPT(cfg)
  schedule = npp.Schedule.from_config(config, steps_per_epoch=100)
  tx, lr_fn = train_step.make_optimizer(config, schedule)
  init_fn, rng = train_step.init_state(model, tx, cfg, 0, ema=False)
  state = jax.jit(lambda r: nn.unbox(init_fn(r)))(rng)
  h, w = cfg.grid
  rs = np.random.default_rng(0)
  batch = {
    "codes": jnp.asarray(rs.integers(0, cfg.vocab_size, (batch_size, h, w)), jnp.int32),
    "labels": jnp.asarray(rs.integers(0, cfg.num_classes, (batch_size,)), jnp.int32),
  }
  return model, schedule, tx, lr_fn, state, batch


def compile_step(model, tx, lr_fn, k: int, state, batch):
  """The train step at patch size k, compiled with the state donated, as the trainer runs it."""
  step = functools.partial(train_step.train_step, model=model, tx=tx, lr_fn=lr_fn, k=k, accum=1)
  return jax.jit(step, donate_argnums=0).lower(state, batch).compile()


def median_step_s(compiled, state, batch, steps: int):
  """(state after the steps, median seconds of `steps` timed steps after one warm-up step)."""
  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return state, statistics.median(times)
