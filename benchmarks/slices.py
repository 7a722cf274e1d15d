"""Which TPU slice each GPT size needs: train steps compiled for real slices here; ESTIMATED times.

  python benchmarks/slices.py --sizes=B,L --slices=v5e:16x16,v5p:4x4x8 > rows.jsonl
  python benchmarks/slices.py --markdown rows.jsonl   # the table of docs/slices.md

Each size (configs/b.py's recipe with model.name GPT-B ... GPT-7B) at its paper global batch (256 up
to XL, 512 above), on each slice: the meshes (fsdp over every chip, then data x fsdp) and remat
policies are tried in order, and the first whose every train_k{k} fits is kept (--mode=compile's own
programs and measurement, npp_jax/jobs/compile.py). One JSON line per (size, slice): mesh, remat,
GiB per device and ESTIMATED s per step per k, ESTIMATED hours per ImageNet epoch at k = 1, and the
NPP schedule's ESTIMATED cost against next-token's.

Needs libtpu. Compiling the larger sizes for 256 chips takes minutes each on 2 cores: run one size
at a time (docs/slices.md says what was run and how long it took).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

# The slice's devices are libtpu's; the process itself runs here, on the CPU.
jax.config.update("jax_platforms", "cpu")

import machine  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)

from npp_jax import chips  # noqa: E402
from npp_jax import config_lib  # noqa: E402
from npp_jax import sharding  # noqa: E402
from npp_jax.jobs import compile as compile_job  # noqa: E402
from npp_jax.models import gpt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = tuple(name.removeprefix("GPT-") for name in gpt.MODEL_SIZES)  # B, L, ..., 7B
PAPER_BATCH = {"B": 256, "L": 256, "XL": 256}  # 512 above XL (LlamaGen's recipe).
IMAGES = 1_281_167


def size_config(size: str, topology: str, mesh, remat: str):
  config = config_lib.load(os.path.join(ROOT, "configs/b.py"))
  config.model.name = f"GPT-{size}"
  config.model.remat = remat
  config.train.global_batch_size = PAPER_BATCH.get(size, 512)
  config.train.grad_accum_steps = 1
  config.mesh.shape = tuple(mesh)
  config.compile.topology = topology
  return config


def meshes(num_chips: int, batch: int):
  """fsdp over all chips first (the state divided most), then data x fsdp with fsdp halving."""
  fsdp = num_chips
  while fsdp >= 1:
    data = num_chips // fsdp
    if batch % (data * fsdp) == 0:
      yield (data, fsdp, 1)
    fsdp //= 2


def train_rows(size: str, topology: str, remats, ks):
  """The first (mesh, remat) whose train steps all fit, with its rows; else the last tried."""
  s = chips.parse_slice(topology)
  batch = PAPER_BATCH.get(size, 512)
  devices = chips.load_topology(s)
  last = None
  for remat in remats:
    for mesh in meshes(s.num_chips, batch):
      config = size_config(size, topology, mesh, remat)
      config.compile.programs = tuple(f"train_k{k}" for k in ks)
      try:
        plan = compile_job.check(config, None)
      except ValueError as e:
        print(f"skip {size} {topology} {mesh} {remat}: {e}", file=sys.stderr)
        continue
      m = sharding.make_mesh(config.mesh, devices)
      rows = [compile_job.measure(p, plan) for p in compile_job.programs(config, plan, m)]
      last = (config, plan, rows)
      if all(r.fits for r in rows):
        return last
      break  # More fsdp than all chips does not exist; try the next remat.
  return last


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default=",".join(SIZES))
  ap.add_argument("--slices", default="v5e:16x16,v5p:4x4x8,v6e:16x16")
  ap.add_argument("--remat", default="none,full")
  ap.add_argument("--ks", default="4,2,1", help="the k to compile (a quick check: --ks=4)")
  ap.add_argument("--markdown", help="print the docs table of a file of this script's JSON lines")
  args = ap.parse_args()
  if args.markdown:
    with open(args.markdown) as f:
      print(markdown([json.loads(line) for line in f if line.strip()]))
    return
  for size in args.sizes.split(","):
    for topology in args.slices.split(","):
      t0 = time.perf_counter()
      found = train_rows(size, topology, args.remat.split(","), args.ks.split(","))
      if found is None:
        continue
      config, plan, rows = found
      print(
        json.dumps(row(size, topology, config, plan, rows, time.perf_counter() - t0)), flush=True
      )


def row(size, topology, config, plan, rows, seconds) -> dict:
  per_k, stages = {r.k: r for r in rows}, plan.schedule.stages
  steps_per_epoch = IMAGES / config.train.global_batch_size
  hours = {k: r.estimated_s * steps_per_epoch / 3600 for k, r in per_k.items() if r.estimated_s}
  npp_h = sum(st.epochs * hours[st.k] for st in stages if st.k in hours)
  ntp_h = plan.schedule.total_epochs * hours[1] if 1 in hours else None
  return {
    "size": size,
    "topology": topology,
    "global_batch": config.train.global_batch_size,
    "mesh": list(plan.mesh_shape),
    "remat": config.model.remat,
    "fits": all(r.fits for r in rows),
    "gib_per_device": {r.k: _gib(r.bytes_per_device) for r in rows},
    "estimated_s_per_step": {r.k: r.estimated_s for r in rows},
    "estimated_h_per_epoch_k1": hours.get(1),
    # Every k of the schedule is needed for the ratio.
    "estimated_npp_vs_ntp": npp_h / ntp_h
    if ntp_h and all(st.k in hours for st in stages)
    else None,
    "compile_s": round(seconds, 1),
    "machine": machine.describe(),  # Where it was compiled (the compile_s figure).
  }


def _gib(n):
  return round(n / chips.GiB, 2) if n else None


def _num(x, fmt):
  return "-" if x is None else format(x, fmt)


def markdown(rows) -> str:
  out = [
    "| size | slice | batch | mesh (data, fsdp, tensor) | remat | fits | GiB/device k=4/2/1 | "
    "ESTIMATED s/step k=4/2/1 | ESTIMATED h/epoch k=1 | ESTIMATED NPP / next-token |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    gib = " / ".join(_num(r["gib_per_device"].get(str(k)), ".2f") for k in (4, 2, 1))
    est = " / ".join(_num(r["estimated_s_per_step"].get(str(k)), ".3f") for k in (4, 2, 1))
    h = r["estimated_h_per_epoch_k1"]
    ratio = r["estimated_npp_vs_ntp"]
    out.append(
      f"| {r['size']} | {r['topology']} | {r['global_batch']} | {tuple(r['mesh'])} | "
      f"{r['remat']} | {'yes' if r['fits'] else 'NO'} | {gib} | {est} | {_num(h, '.2f')} | "
      f"{_num(ratio, '.2f')} |"
    )
  return "\n".join(out)


if __name__ == "__main__":
  main()
