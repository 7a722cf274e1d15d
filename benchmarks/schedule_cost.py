"""Wall-clock of a whole NPP schedule against next-token training for the same epochs, on this
machine.

  python benchmarks/schedule_cost.py [--epochs=8 --dim=128 --layers=4 --batch=32 --examples=512]

Both runs go through the training job (jobs.train.run) on the same synthetic code data set (16x16
grid). Prints one JSON line: measured_ratio (NPP training seconds / next-token training seconds,
compilation excluded; measured_ratio_with_compile includes it) next to token_ratio (0.578 for L=3,
r=0.5) and flop_ratio.
"""

import argparse
import datetime
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import machine  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)

from npp_jax import config_lib  # noqa: E402
from npp_jax import costs  # noqa: E402
from npp_jax import npp  # noqa: E402
from npp_jax.data import code_dataset  # noqa: E402
from npp_jax.jobs import train  # noqa: E402
from npp_jax.models import gpt  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--epochs", type=int, default=8)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--dim", type=int, default=128)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=1024)
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--examples", type=int, default=512)
  args = ap.parse_args()

  tmp = tempfile.mkdtemp(prefix="npp_schedule_cost_")
  rs = np.random.default_rng(0)
  labels = rs.integers(0, 10, args.examples)
  codes = rs.integers(0, args.vocab, (args.examples, 2, 16, 16))
  code_dataset.write_code_dataset(
    os.path.join(tmp, "codes"), codes, labels, vocab_size=args.vocab, num_classes=10
  )

  def config(stages):
    c = config_lib.base_config()
    c.model.name = "custom"
    c.model.n_layer, c.model.n_head, c.model.dim = args.layers, args.heads, args.dim
    c.model.vocab_size, c.model.num_classes, c.model.dtype = args.vocab, 10, "float32"
    c.data.path = os.path.join(tmp, "codes")
    c.train.epochs = args.epochs
    c.train.global_batch_size = args.batch
    c.train.log_every_steps = 10**9  # Only the last step: no host syncs inside the timed loop.
    c.train.checkpoint_every_steps = 10**9  # Only the final save.
    c.optim.warmup_epochs = 0.5
    c.npp.stages = stages
    c.mesh.shape = (1, 1, 1)
    return c

  npp_cfg = config(())  # The release's L=3, r=0.5 over train.epochs.
  ntp_cfg = config(((1, args.epochs),))
  runs = {}
  for name, c in (("npp", npp_cfg), ("ntp", ntp_cfg)):
    runs[name] = train.run(c, os.path.join(tmp, name)).outputs
  cfg = gpt.GPTConfig.from_config(npp_cfg.model)
  schedule = npp.Schedule.from_config(npp_cfg, steps_per_epoch=args.examples // args.batch)
  out = {
    "model": {"layers": args.layers, "dim": args.dim, "vocab": args.vocab, "grid": 16},
    "batch": args.batch,
    "epochs": args.epochs,
    "steps": runs["ntp"]["step"],
    "schedule": [[s.k, s.epochs] for s in schedule.stages],
    "npp_train_s": round(runs["npp"]["train_s"], 2),
    "ntp_train_s": round(runs["ntp"]["train_s"], 2),
    "npp_compile_s": round(runs["npp"]["compile_s"], 2),
    "ntp_compile_s": round(runs["ntp"]["compile_s"], 2),
    "measured_ratio": round(runs["npp"]["train_s"] / runs["ntp"]["train_s"], 3),
    "measured_ratio_with_compile": round(runs["npp"]["loop_s"] / runs["ntp"]["loop_s"], 3),
    "token_ratio": round(schedule.token_ratio(), 3),
    "flop_ratio": round(costs.schedule_flop_ratio(schedule, cfg), 3),
    "device": machine.describe(),
    "cpu_count": os.cpu_count(),
    "date": datetime.date.today().isoformat(),
  }
  print(json.dumps(out))


if __name__ == "__main__":
  main()
