"""The machine a benchmark ran on, for its JSON line (docs/performance.md names machine and
date)."""

import os
import platform

import jax


def describe() -> str:
  """'NVIDIA H100 80GB HBM3 x8', or 'cpu (<model name>, 2 cores)' where the accelerator is the
  host."""
  d = jax.devices()[0]
  if d.platform != "cpu":
    return f"{d.device_kind} x{jax.device_count()}"
  model = platform.processor() or "cpu"
  if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      model = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), model)
  return f"cpu ({model}, {os.cpu_count()} cores)"
