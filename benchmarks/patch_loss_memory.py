"""Logits memory of the patch loss (forward + backward) at k = 1, 2, 4, from XLA's compiled
memory_analysis.

  python benchmarks/patch_loss_memory.py --batch=8 --grid=16 --vocab=16384

Ours scores one [B, n/k^2, V] logits tensor against k^2 targets per position; the release's
formulation repeats the logits k^2 times first. Prints one JSON line with the bytes XLA allocates
for each (arguments + temporaries + outputs of the compiled value-and-grad), so the k^2 saving is
read off the compiler.
"""

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import machine  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)

from npp_jax import npp  # noqa: E402


def repeated_loss(logits, targets):
  """The release's way: repeat the logits k^2 times, then a standard cross-entropy."""
  kk = targets.shape[-1]
  rep = jnp.repeat(logits[:, :, None, :], kk, axis=2)
  return optax.softmax_cross_entropy_with_integer_labels(rep, targets).mean()


def allocated(fn, logits, targets):
  m = jax.jit(jax.value_and_grad(fn)).lower(logits, targets).compile().memory_analysis()
  return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--grid", type=int, default=16)
  ap.add_argument("--vocab", type=int, default=16384)
  args = ap.parse_args()
  out = {
    "batch": args.batch,
    "grid": args.grid,
    "vocab": args.vocab,
    "device": machine.describe(),
    "date": datetime.date.today().isoformat(),
  }
  for k in (1, 2, 4):
    n = npp.num_patches((args.grid, args.grid), k)
    logits = jax.ShapeDtypeStruct((args.batch, n, args.vocab), jnp.float32)
    targets = jax.ShapeDtypeStruct((args.batch, n, k * k), jnp.int32)
    out[f"ours_bytes_k{k}"] = allocated(npp.patch_loss, logits, targets)
    out[f"repeated_bytes_k{k}"] = allocated(repeated_loss, logits, targets)
  for k in (2, 4):
    out[f"ours_k1_over_k{k}"] = round(out["ours_bytes_k1"] / out[f"ours_bytes_k{k}"], 2)
    out[f"repeated_over_ours_k{k}"] = round(
      out[f"repeated_bytes_k{k}"] / out[f"ours_bytes_k{k}"], 2
    )
  print(json.dumps(out))


if __name__ == "__main__":
  main()
