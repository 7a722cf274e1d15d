"""Behaviour kept across refactors: today's sampler, converter, VQ and NPP loss against outputs
saved from the code at commit 255f37a (support/make_golden.py wrote tests/data/golden.npz; this test
never writes it).

What is discrete is compared exactly: sampled codes, VQ codes, random and converted weights. Floats
are compared at fp32 error bounds: the golden file was written on one CPU, the suite runs on others,
whose XLA code sums in another order (vector widths, fused multiply-adds, fusion choices).

* A sum or dot product of n terms computed in fp32, in ANY order, with or without FMA, is within
  gamma(n) * sum|terms| of the exact value (Higham, Accuracy and Stability of Numerical
  Algorithms, section 3.1).
* A network output is charged gamma(N), N the number of terms summed along its longest dependency
  path (every reduction the output waits for), times sum|terms| of its last reduction: first-order
  error analysis, where each normalisation (RMSNorm, GroupNorm) brings its output back to the scale
  of the next reduction's terms, so that the relative errors of the stages add up.
* The golden machine's result and this machine's are each within that bound of the exact value:
  they may differ by twice the bound.
The worst-case bound, not the tighter probabilistic one (sqrt(n)): the differences between CPUs are
systematic (another order on every run), not random.
"""

import os

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support import golden_inputs

from npp_jax import sharding
from npp_jax.models import vq

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "golden.npz")
U = 2.0**-24  # Unit roundoff of float32 (round to nearest).


def gamma(n):
  """Higham's gamma_n = n u / (1 - n u): the bound of an n-term fp32 sum, relative to sum|terms|."""
  return n * U / (1 - n * U)


def gpt_path_length(cfg, seq):
  """Terms summed along the longest dependency path of a GPT forward pass over `seq` positions."""
  block = (
    cfg.dim  # attention_norm's mean of squares
    + cfg.dim  # wqkv
    + cfg.head_dim  # q . k
    + 2 * seq  # the softmax's normaliser, then the weighted sum of values
    + cfg.n_head * cfg.head_dim  # wo
    + cfg.dim  # ffn_norm
    + cfg.dim  # w1 and w3
    + cfg.ffn_dim  # w2
  )
  return cfg.n_layer * block + 2 * cfg.dim  # The final norm and the output projection.


def logit_scale(model, params, codes, labels, k):
  """sum|terms| of every logit: |final normed hidden state| @ |output kernel| (float64)."""

  def hidden(params, codes, labels):
    _, inter = model.apply(
      {"params": params}, codes, labels, patch_size=k, capture_intermediates=True
    )
    return inter["intermediates"]["norm"]["__call__"][0]

  h = np.abs(np.asarray(jax.jit(hidden)(params, codes, labels), np.float64))
  return h @ np.abs(np.asarray(params["output"]["kernel"], np.float64))


def vq_decoder_path_length(cfg):
  """Terms summed along the longest dependency path from codes to decoded pixels."""
  hw = cfg.grid[0] * cfg.grid[1]

  def group_norm(c, hw):
    return 2 * (c // cfg.norm_groups) * hw  # The group's mean, then its (two-pass) variance.

  def res(cin, cout, hw):  # norm1, conv1, norm2, conv2 (the shortcut's path is shorter)
    return group_norm(cin, hw) + 9 * cin + group_norm(cout, hw) + 9 * cout

  def attn(c, hw):
    return group_norm(c, hw) + 3 * c + 2 * hw  # q, q . k, proj_out; softmax sum, weighted v

  c = cfg.ch * cfg.ch_mult[-1]
  n = 2 * cfg.codebook_embed_dim  # The codebook rows' L2 norms, post_quant_conv.
  n += 9 * cfg.z_channels + res(c, c, hw) + attn(c, hw) + res(c, c, hw)  # conv_in, mid
  for i, mult in enumerate(reversed(cfg.ch_mult)):
    for _ in range(cfg.num_res_blocks + 1):
      n += res(c, cfg.ch * mult, hw) + (attn(cfg.ch * mult, hw) if i == 0 else 0)
      c = cfg.ch * mult
    if i < len(cfg.ch_mult) - 1:
      hw *= 4
      n += 9 * c  # Upsample's conv.
  return n + group_norm(c, hw) + 9 * c  # norm_out, conv_out


def pixel_scale(params, codes, cfg):
  """sum|terms| of every decoded pixel: conv_out of |swish(norm_out)| with |kernel|, plus |bias|."""

  def hidden(params, codes):
    _, inter = vq.VQModel(cfg).apply(
      {"params": params}, codes, method=vq.VQModel.decode_codes, capture_intermediates=True
    )
    return inter["intermediates"]["decoder"]["norm_out"]["__call__"][0]

  h = np.asarray(jax.jit(hidden)(params, codes), np.float64)
  conv = params["decoder"]["conv_out"]
  terms = jax.lax.conv_general_dilated(
    np.abs(h * (1 / (1 + np.exp(-h)))).astype(np.float32),
    np.abs(np.asarray(conv["kernel"], np.float32)),
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    precision=jax.lax.Precision.HIGHEST,
  )  # A scale, not a result: fp32 is precise enough for it.
  return np.asarray(terms, np.float64) + np.abs(np.asarray(conv["bias"], np.float64))


def assert_within(got, want, bound, what):
  """|got - want| <= bound elementwise; the message says by how much the worst element is off."""
  diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
  worst = np.unravel_index(np.argmax(diff / bound), diff.shape)
  assert np.all(diff <= bound), (
    f"{what}: {int(np.sum(diff > bound))} of {diff.size} elements beyond the fp32 bound; at "
    f"{tuple(int(i) for i in worst)} |diff| = {diff[worst]:.3g}, bound {bound[worst]:.3g}"
  )


@pytest.fixture(scope="module")
def golden():
  with np.load(GOLDEN) as f:
    return dict(f)


def _tree(golden, prefix):
  flat = {k[len(prefix) :]: v for k, v in golden.items() if k.startswith(prefix)}
  return traverse_util.unflatten_dict(flat, sep="/")


def test_random_params_unchanged(golden):
  _, _, params = golden_inputs.tiny_gpt()
  flat = traverse_util.flatten_dict(params, sep="/")
  assert sorted(flat) == sorted(
    k[len("gpt_params/") :] for k in golden if k.startswith("gpt_params/")
  )
  for path, x in flat.items():
    np.testing.assert_array_equal(np.asarray(x), golden[f"gpt_params/{path}"], err_msg=path)


@pytest.mark.parametrize("case", sorted(golden_inputs.SAMPLER_CASES))
def test_sampler_codes_unchanged(golden, case):
  cfg, _, _ = golden_inputs.tiny_gpt()
  params = _tree(golden, "gpt_params/")
  codes = golden_inputs.sample(cfg, params, **golden_inputs.SAMPLER_CASES[case])
  np.testing.assert_array_equal(np.asarray(codes), golden[f"sample/{case}"])


def test_sampler_codes_unchanged_on_8_devices(golden):
  cfg, _, _ = golden_inputs.tiny_gpt()
  params = _tree(golden, "gpt_params/")
  mesh = sharding.make_mesh(golden_inputs.convert_config().mesh, jax.devices()[:8])
  codes = golden_inputs.sample(cfg, params, mesh=mesh, **golden_inputs.SAMPLER_CASES["cfg"])
  np.testing.assert_array_equal(np.asarray(codes), golden["sample/cfg"])


def test_npp_loss_unchanged(golden):
  cfg, model, _ = golden_inputs.tiny_gpt()
  params = _tree(golden, "gpt_params/")
  got = golden_inputs.losses(cfg, model, params)
  codes, labels = (jnp.asarray(x) for x in golden_inputs.loss_batch(cfg))
  n_pos = cfg.grid[0] * cfg.grid[1]
  for k in (1, 2, 4):
    seq = n_pos // k**2
    scale = logit_scale(model, params, codes, labels, k)
    # Each machine's logits are within gamma(N) * scale of the exact ones.
    logit_bound = gamma(gpt_path_length(cfg, seq)) * scale
    if k == 1:
      assert_within(got["logits"], golden["loss/logits"], 2 * logit_bound, "logits")
    # The patch loss is logsumexp(z) - mean_i z[t_i] averaged over positions: each part moves by at
    # most max|dz|; the sum of V exponentials (all positive) adds gamma(V) relative and exp and log
    # a few ulp (4 u) to the logsumexp; the mean over B * positions adds gamma(B * seq) * |loss|.
    loss = float(got[f"k{k}"])
    per_run = (
      2 * logit_bound.max()
      + gamma(cfg.vocab_size)
      + 4 * U
      + gamma(codes.shape[0] * seq) * abs(loss)
    )
    assert_within(loss, golden[f"loss/k{k}"], np.asarray(2 * per_run), f"loss at k={k}")


@pytest.mark.parametrize("kind", ["gpt", "vq"])
def test_converter_unchanged(golden, kind):
  state = {
    k[len(f"torch_{kind}/") :]: v for k, v in golden.items() if k.startswith(f"torch_{kind}/")
  }
  got = traverse_util.flatten_dict(golden_inputs.convert(kind, state), sep="/")
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
  codes, decoded = golden_inputs.vq_roundtrip(state)
  np.testing.assert_array_equal(codes, golden["vq/codes"])
  c = golden_inputs.convert_config()
  cfg = vq.VQConfig.from_config(c.vq)
  params = golden_inputs.convert("vq", state)
  # Each machine's pixels are within gamma(N) * scale of the exact ones.
  bound = gamma(vq_decoder_path_length(cfg)) * pixel_scale(params, jnp.asarray(codes), cfg)
  assert_within(decoded, golden["vq/decoded"], 2 * bound, "decoded pixels")
