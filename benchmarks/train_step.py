"""Seconds per train step at k = 1, 2, 4 for a named config, and what that makes of a whole
schedule.

  python benchmarks/train_step.py --config=configs/b.py --batch=8 --dtype=float32

Prints one JSON line: step_s_k{1,2,4} (median seconds), tokens_per_s_k*, compile_s_k*, and the
schedule's predicted relative cost (token_ratio, flop_ratio) next to the one these step times give
(measured_ratio).
"""

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpt_step  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)
import machine  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from npp_jax import costs  # noqa: E402
from npp_jax import npp  # noqa: E402
from npp_jax.models import gpt  # noqa: E402


def load_config(path):
  name, _, arg = path.partition(":")
  module = config_flags.config_flags._LoadConfigModule("bench_config", name)  # pylint: disable=protected-access
  return module.get_config(arg) if arg else module.get_config()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/b.py")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=3, help="timed steps per k, after one warm-up step")
  ap.add_argument(
    "--dtype", default="float32", help="compute dtype (float32 on CPU, bfloat16 on GPU/TPU)"
  )
  ap.add_argument("--ks", default="1,2,4")
  args = ap.parse_args()

  config = load_config(args.config)
  config.model.dtype = args.dtype
  cfg = gpt.GPTConfig.from_config(config.model)
  model, schedule, tx, lr_fn, state, batch = gpt_step.setup(config, args.batch)

  out = {
    "config": args.config,
    "model": config.model.name,
    "params_m": round(gpt.count_params(cfg) / 1e6, 1),
    "batch": args.batch,
    "dtype": args.dtype,
    "grid": list(cfg.grid),
    "device": machine.describe(),
    "cpu_count": os.cpu_count(),
    "date": datetime.date.today().isoformat(),
  }
  peak = costs.peak_flops_per_device()
  for k in [int(x) for x in args.ks.split(",")]:
    t0 = time.perf_counter()
    compiled = gpt_step.compile_step(model, tx, lr_fn, k, state, batch)
    out[f"compile_s_k{k}"] = round(time.perf_counter() - t0, 2)
    state, s = gpt_step.median_step_s(compiled, state, batch, args.steps)
    out[f"step_s_k{k}"] = round(s, 4)
    out[f"tokens_per_s_k{k}"] = round(args.batch * npp.num_patches(cfg.grid, k) / s, 1)
    flops = costs.train_step_flops(cfg, k, args.batch).total
    out[f"gflop_k{k}"] = round(flops / 1e9, 1)
    util = costs.mfu(flops, s, 1, peak)
    if util is not None:
      out[f"mfu_k{k}"] = round(util, 4)
  if all(f"step_s_k{k}" in out for k in (1, 2, 4)):
    out["ratio_k2_k1"] = round(out["step_s_k2"] / out["step_s_k1"], 3)
    out["ratio_k4_k1"] = round(out["step_s_k4"] / out["step_s_k1"], 3)
    spent = sum(
      st.epochs * out[f"step_s_k{st.k}"] for st in schedule.stages if f"step_s_k{st.k}" in out
    )
    out["schedule"] = [[st.k, st.epochs] for st in schedule.stages]
    out["token_ratio"] = round(schedule.token_ratio(), 3)
    out["flop_ratio"] = round(costs.schedule_flop_ratio(schedule, cfg), 3)
    out["measured_ratio"] = round(spent / (schedule.total_epochs * out["step_s_k1"]), 3)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
