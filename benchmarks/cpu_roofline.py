"""The roofline of --mode=compile held against a measured step: this CPU's peak, bandwidth, GPT-B.

  python benchmarks/cpu_roofline.py --config=configs/b.py --batch=8 --time   # on an idle machine

Measures this CPU's peak FLOP/s (a float32 matmul, best of --repeats) and memory bandwidth (a large
array read and written once), compiles benchmarks/train_step.py's GPT-B train step at each k for
this CPU, reads XLA's cost analysis (FLOPs, bytes accessed) and makes the ESTIMATE that
--mode=compile makes for a TPU: max(FLOPs / peak, bytes / bandwidth). With --time it also times
the step (median of --steps after a warm-up): estimate and measurement from one run. One JSON line.
"""

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt_step  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)
import machine  # noqa: E402

from npp_jax import config_lib  # noqa: E402


def best_seconds(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return min(times)


def peak_flops(n: int, repeats: int) -> float:
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32)
  return 2 * n**3 / best_seconds(jax.jit(jnp.matmul), a, a, repeats=repeats)


def bandwidth(mib: int, repeats: int) -> float:
  x = jnp.asarray(np.random.default_rng(1).standard_normal(mib * 2**18), jnp.float32)
  return 2 * x.nbytes / best_seconds(jax.jit(lambda v: v * 1.5), x, repeats=repeats)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/b.py")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--ks", default="1,2,4")
  ap.add_argument("--matmul", type=int, default=2048, help="n of the n x n peak-FLOP/s matmul")
  ap.add_argument("--mib", type=int, default=512, help="MiB of the bandwidth array")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--time", action="store_true", help="also time the train steps")
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args()

  config = config_lib.load(args.config)
  config.model.dtype = "float32"
  peak, bw = peak_flops(args.matmul, args.repeats), bandwidth(args.mib, args.repeats)
  out = {
    "config": args.config,
    "model": config.model.name,
    "batch": args.batch,
    "device": machine.describe(),
    "date": datetime.date.today().isoformat(),
    "peak_gflop_s": round(peak / 1e9, 1),
    "bandwidth_gb_s": round(bw / 1e9, 2),
  }
  model, _, tx, lr_fn, state, batch = gpt_step.setup(config, args.batch)
  for k in [int(x) for x in args.ks.split(",")]:
    compiled = gpt_step.compile_step(model, tx, lr_fn, k, state, batch)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops, accessed = float(cost["flops"]), float(cost["bytes accessed"])
    out[f"gflop_k{k}"] = round(flops / 1e9, 1)
    out[f"gb_accessed_k{k}"] = round(accessed / 1e9, 2)
    out[f"estimated_s_k{k}"] = round(max(flops / peak, accessed / bw), 3)
    if args.time:
      state, seconds = gpt_step.median_step_s(compiled, state, batch, args.steps)
      out[f"step_s_k{k}"] = round(seconds, 3)
      out[f"measured_over_estimate_k{k}"] = round(out[f"step_s_k{k}"] / out[f"estimated_s_k{k}"], 2)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
