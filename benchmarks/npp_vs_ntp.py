"""NPP against next-token training on the demo's digits, at several budgets; one JSON line per
point.

    python benchmarks/npp_vs_ntp.py --workdir=/tmp/npp_vs_ntp [--multiples=1,2,4]
    [--patch_levels=2,3]
        [--seeds=2] [--config=configs/demo.py] [--set=train.global_batch_size=64 ...]

Every point is the demo's comparison (npp_jax.demo.compare): NPP for E epochs, next-token for E
epochs and next-token for NPP's measured wall time, each trained, sampled and scored (held-out NLL,
class information, sample accuracy, Frechet distance) for `--seeds` GPT seeds, with E = multiple x
the config's train.epochs. One VQ, one code data set and one scorer serve every point (trained once
in WORKDIR), so the points differ only in the GPT's budget and schedule. Points resume: a finished
one is read back from its report.json. The whole grid at 1x, 2x, 4x and L = 2, 3 with 2 seeds is
about 14x the demo's GPT time: hours on 2 cores.
"""

import argparse
import datetime
import json
import os
import sys
import time

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import machine  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)

from npp_jax import config_lib  # noqa: E402
from npp_jax.demo import report as demo_report  # noqa: E402
from npp_jax.jobs import demo  # noqa: E402


def _ints(text: str, name: str) -> list[int]:
  try:
    values = [int(v) for v in text.split(",") if v.strip()]
  except ValueError:
    values = []
  if not values or min(values) < 1:
    raise SystemExit(
      f"error: --{name}={text!r}; expected comma-separated positive integers, e.g. 1,2,4"
    )
  return values


def _point(report: dict) -> dict:
  keep = (
    "epochs",
    "wall_s",
    "eval_nll",
    "class_info",
    "accuracy",
    "frechet",
    "relative_cost",
    "spread",
  )
  return {
    row: {k: report[row][k] for k in keep if k in report[row]}
    for row, _ in demo_report.ROWS
    if row in report
  }


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--config", default="configs/demo.py")
  ap.add_argument("--multiples", default="1,2,4", help="E = multiple x the config's train.epochs")
  ap.add_argument("--patch_levels", default="2,3", help="npp.patch_level values (L)")
  ap.add_argument("--seeds", type=int, default=2)
  ap.add_argument(
    "--set", nargs="*", default=[], help="config overrides, key=value (Python literals)"
  )
  args = ap.parse_args()
  multiples, levels = _ints(args.multiples, "multiples"), _ints(args.patch_levels, "patch_levels")
  config = config_lib.load(args.config)
  config.update_from_flattened_dict(
    {k: _literal(v) for k, v in (kv.split("=", 1) for kv in args.set)}
  )
  config.demo.seeds = args.seeds
  base_epochs = config.train.epochs

  os.makedirs(args.workdir, exist_ok=True)
  with demo.library_log(os.path.join(args.workdir, "log.txt")):
    prepared = demo.prepare(config, args.workdir)
    if prepared is None:
      raise SystemExit("stopped during VQ training (SIGTERM); run the same command again to resume")
    config, vq_dir = prepared
    for level in levels:
      for m in multiples:
        c = ml_collections.ConfigDict(config.to_dict())
        c.train.epochs, c.npp.patch_level = base_epochs * m, level
        point_dir = os.path.join(args.workdir, f"L{level}_x{m}")
        t0 = time.perf_counter()
        report = demo.compare(c, vq_dir, point_dir, shared=args.workdir)
        demo_report.table(report)
        print(
          json.dumps(
            {
              "benchmark": "npp_vs_ntp",
              "patch_level": level,
              "epochs": c.train.epochs,
              "multiple": m,
              "seeds": args.seeds,
              **_point(report),
              "calibration": report["calibration"],
              "point_wall_s": round(time.perf_counter() - t0, 1),
              "load_avg_1m": round(os.getloadavg()[0], 2),
              "device": machine.describe(),
              "date": datetime.date.today().isoformat(),
            }
          ),
          flush=True,
        )


def _literal(text: str):
  import ast

  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


if __name__ == "__main__":
  main()
