"""Writes tests/data/golden.npz: outputs of the sampler, the converter, the VQ and the NPP loss,
saved from the code as it stood at commit 255f37a (before the "One house" refactor).
tests/test_golden.py checks that today's code reproduces them exactly (codes, converted weights) or
within fp32 round-off (losses).

  python tests/support/make_golden.py  # only to re-create the file on purpose; no test writes it
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tests/, so that `support` imports as it does under pytest.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import traverse_util  # noqa: E402
import numpy as np  # noqa: E402

from support import golden_inputs


def main():
  out = {}
  cfg, model, params = golden_inputs.tiny_gpt()
  for path, x in traverse_util.flatten_dict(params, sep="/").items():
    out[f"gpt_params/{path}"] = np.asarray(x)
  for name, kw in golden_inputs.SAMPLER_CASES.items():
    out[f"sample/{name}"] = np.asarray(golden_inputs.sample(cfg, params, **kw))
  out.update({f"loss/{k}": v for k, v in golden_inputs.losses(cfg, model, params).items()})
  gpt_state, vq_state = golden_inputs.torch_states()
  out.update({f"torch_gpt/{k}": v for k, v in gpt_state.items()})
  out.update({f"torch_vq/{k}": v for k, v in vq_state.items()})
  for kind, state in (("gpt", gpt_state), ("vq", vq_state)):
    converted = golden_inputs.convert(kind, state)
    for path, x in traverse_util.flatten_dict(converted, sep="/").items():
      out[f"converted_{kind}/{path}"] = np.asarray(x)
  out["vq/codes"], out["vq/decoded"] = golden_inputs.vq_roundtrip(vq_state)
  path = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "golden.npz"
  )
  np.savez_compressed(path, **out)
  print(f"wrote {path}: {len(out)} arrays, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
  main()
