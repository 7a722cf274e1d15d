"""Behaviour kept across refactors: today's sampler, converter, VQ and NPP loss against outputs saved from
the code at commit 255f37a (tests/make_golden.py wrote tests/data/golden.npz; this test never writes it).

Sampled codes and converted weights must be identical; losses and logits equal within 1e-6 relative (fp32,
the same XLA program up to fusion order); VQ codes identical, decoded images within 1e-5 absolute.
"""

import os

from flax import traverse_util
import golden_setup  # noqa: E402  (tests/ is on sys.path)
import jax
import numpy as np
import pytest

from npp_jax import sharding

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden.npz")


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as f:
    return dict(f)


def _tree(golden, prefix):
  flat = {k[len(prefix) :]: v for k, v in golden.items() if k.startswith(prefix)}
  return traverse_util.unflatten_dict(flat, sep="/")


def test_random_params_unchanged(golden):
  _, _, params = golden_setup.tiny_gpt()
  flat = traverse_util.flatten_dict(params, sep="/")
  assert sorted(flat) == sorted(
    k[len("gpt_params/") :] for k in golden if k.startswith("gpt_params/")
  )
  for path, x in flat.items():
    np.testing.assert_array_equal(np.asarray(x), golden[f"gpt_params/{path}"], err_msg=path)


@pytest.mark.parametrize("case", sorted(golden_setup.SAMPLER_CASES))
def test_sampler_codes_unchanged(golden, case):
  cfg, _, _ = golden_setup.tiny_gpt()
  params = _tree(golden, "gpt_params/")
  codes = golden_setup.sample(cfg, params, **golden_setup.SAMPLER_CASES[case])
  np.testing.assert_array_equal(np.asarray(codes), golden[f"sample/{case}"])


def test_sampler_codes_unchanged_on_8_devices(golden):
  cfg, _, _ = golden_setup.tiny_gpt()
  params = _tree(golden, "gpt_params/")
  mesh = sharding.make_mesh(golden_setup.convert_config().mesh, jax.devices()[:8])
  codes = golden_setup.sample(cfg, params, mesh=mesh, **golden_setup.SAMPLER_CASES["cfg"])
  np.testing.assert_array_equal(np.asarray(codes), golden["sample/cfg"])


def test_npp_loss_unchanged(golden):
  cfg, model, _ = golden_setup.tiny_gpt()
  got = golden_setup.losses(cfg, model, _tree(golden, "gpt_params/"))
  for key, value in got.items():
    np.testing.assert_allclose(value, golden[f"loss/{key}"], rtol=1e-6, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("kind", ["gpt", "vq"])
def test_converter_unchanged(golden, kind):
  state = {
    k[len(f"torch_{kind}/") :]: v for k, v in golden.items() if k.startswith(f"torch_{kind}/")
  }
  got = traverse_util.flatten_dict(golden_setup.convert(kind, state), sep="/")
  want = {
    k[len(f"converted_{kind}/") :]: v
    for k, v in golden.items()
    if k.startswith(f"converted_{kind}/")
  }
  assert sorted(got) == sorted(want)
  for path, x in got.items():
    assert np.asarray(x).dtype == want[path].dtype, path
    np.testing.assert_array_equal(np.asarray(x), want[path], err_msg=path)


def test_vq_unchanged(golden):
  state = {k[len("torch_vq/") :]: v for k, v in golden.items() if k.startswith("torch_vq/")}
  codes, decoded = golden_setup.vq_roundtrip(state)
  np.testing.assert_array_equal(codes, golden["vq/codes"])
  np.testing.assert_allclose(decoded, golden["vq/decoded"], rtol=0, atol=1e-5)
