"""The NPP op against plain NumPy: aggregation, target grouping, patch loss, stages and learning
rates."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from npp_jax import config_lib
from npp_jax import npp

GRIDS = [(16, 16), (24, 24), (32, 32), (8, 24)]


def np_aggregate(emb, grid, k):
  """Loop reference: patch p = (pr, pc) in raster order is the mean of its k*k tokens."""
  h, w = grid
  b, _, d = emb.shape
  out = np.zeros((b, (h // k) * (w // k), d), np.float64)
  for pr in range(h // k):
    for pc in range(w // k):
      acc = np.zeros((b, d))
      for i in range(k):
        for j in range(k):
          acc += emb[:, (pr * k + i) * w + pc * k + j]
      out[:, pr * (w // k) + pc] = acc / (k * k)
  return out


def np_group(tokens, k):
  b, h, w = tokens.shape
  out = np.zeros((b, (h // k) * (w // k), k * k), tokens.dtype)
  for pr in range(h // k):
    for pc in range(w // k):
      for i in range(k):
        for j in range(k):
          out[:, pr * (w // k) + pc, i * k + j] = tokens[:, pr * k + i, pc * k + j]
  return out


def np_repeated_loss(logits, targets):
  """The release's formulation: repeat logits k^2 times, cross-entropy per (position, target)."""
  b, n, v = logits.shape
  kk = targets.shape[-1]
  rep = np.repeat(logits[:, :, None, :], kk, axis=2).reshape(-1, v).astype(np.float64)
  m = rep.max(-1, keepdims=True)
  logp = rep - (m + np.log(np.exp(rep - m).sum(-1, keepdims=True)))
  return -logp[np.arange(rep.shape[0]), targets.reshape(-1)].mean()


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_aggregate_and_group_match_numpy(grid, k):
  h, w = grid
  rng = np.random.default_rng(h * 100 + w + k)
  emb = rng.normal(size=(2, h * w, 6)).astype(np.float32)
  got = npp.aggregate(jnp.asarray(emb), grid, k)
  chex.assert_shape(got, (2, (h // k) * (w // k), 6))
  chex.assert_tree_all_finite(got)
  # fp32 sums of at most 64 unit normals: 1e-5 absolute is ample.
  np.testing.assert_allclose(np.asarray(got), np_aggregate(emb, grid, k), atol=1e-5, rtol=1e-5)

  tokens = rng.integers(0, 1000, size=(2, h, w)).astype(np.int32)
  targets = npp.group_targets(jnp.asarray(tokens), k)
  chex.assert_type(targets, jnp.int32)
  np.testing.assert_array_equal(np.asarray(targets), np_group(tokens, k))


def test_aggregate_keeps_bf16_dtype_and_accuracy():
  rng = np.random.default_rng(0)
  emb = rng.normal(size=(1, 256, 8)).astype(np.float32)
  got = npp.aggregate(jnp.asarray(emb, jnp.bfloat16), (16, 16), 8)
  chex.assert_type(got, jnp.bfloat16)
  # Only the input and output roundings of bf16 (2^-8 relative) remain: the sum itself is in fp32.
  ref = np_aggregate(np.asarray(jnp.asarray(emb, jnp.bfloat16).astype(jnp.float32)), (16, 16), 8)
  np.testing.assert_allclose(np.asarray(got, np.float32), ref, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("grid", [(16, 16), (24, 24), (8, 24)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_patch_loss_equals_repeated_logits(grid, k):
  h, w = grid
  rng = np.random.default_rng(k + h)
  n = (h // k) * (w // k)
  logits = rng.normal(scale=3.0, size=(2, n, 50)).astype(np.float32)
  tokens = rng.integers(0, 50, size=(2, h, w)).astype(np.int32)
  targets = np.asarray(npp.group_targets(jnp.asarray(tokens), k))
  got = float(npp.patch_loss(jnp.asarray(logits), jnp.asarray(targets)))
  # fp32 logsumexp over 50 classes vs float64 reference.
  np.testing.assert_allclose(got, np_repeated_loss(logits, targets), rtol=1e-5)


def test_patch_loss_mask_drops_rows():
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(2, 4, 10)).astype(np.float32)
  targets = rng.integers(0, 10, size=(2, 4, 4)).astype(np.int32)
  mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], np.float32)
  got = float(npp.patch_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask)))
  keep = mask.astype(bool)
  ref = np_repeated_loss(logits[keep][None], targets[keep][None])
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_shift_inputs():
  rng = np.random.default_rng(4)
  cond = rng.normal(size=(2, 1, 3)).astype(np.float32)
  patches = rng.normal(size=(2, 5, 3)).astype(np.float32)
  got = np.asarray(npp.shift_inputs(jnp.asarray(cond), jnp.asarray(patches)))
  np.testing.assert_array_equal(got, np.concatenate([cond, patches[:, :-1]], axis=1))


@pytest.mark.parametrize("k, grid", [(3, (16, 16)), (4, (16, 18)), (0, (16, 16)), (16, (8, 8))])
def test_bad_patch_size_is_a_clear_error(k, grid):
  with pytest.raises(ValueError, match=f"patch size k={k}"):
    npp.check_patch_size(k, grid)
  with pytest.raises(ValueError, match="does not divide"):
    npp.group_targets(jnp.zeros((1, *grid), jnp.int32), k)


def test_release_stages_match_the_release():
  assert npp.release_stages(3, 0.5, 300) == [(4, 75.0), (2, 75.0), (1, 150.0)]
  assert npp.release_stages(2, 0.5, 300) == [(2, 150.0), (1, 150.0)]
  assert npp.release_stages(4, 0.5, 300) == [(8, 37.0), (4, 38.0), (2, 75.0), (1, 150.0)]
  assert npp.release_stages(1, 0.5, 300) == [(1, 300.0)]
  for bad in (0.0, 1.0, -0.5, 1.5):
    with pytest.raises(ValueError, match="epoch_rate"):
      npp.release_stages(3, bad, 300)
  with pytest.raises(ValueError, match="train.epochs"):
    npp.release_stages(3, 0.5, 0)


def test_token_ratio_of_release_schedules():
  c = config_lib.base_config()
  sched = npp.Schedule.from_config(c, steps_per_epoch=10)
  np.testing.assert_allclose(sched.token_ratio(), (75 / 16 + 75 / 4 + 150) / 300)
  assert round(sched.token_ratio(), 3) == 0.578
  c.npp.patch_level = 2
  np.testing.assert_allclose(npp.Schedule.from_config(c, 10).token_ratio(), 0.625)


def test_explicit_stages_and_k_at_boundaries():
  c = config_lib.base_config()
  c.npp.stages = ((4, 2), (2, 1), (1, 3))
  s = npp.Schedule.from_config(c, steps_per_epoch=5)
  assert [(st.k, st.start_step, st.end_step) for st in s.stages] == [
    (4, 0, 10),
    (2, 10, 15),
    (1, 15, 30),
  ]
  assert s.total_steps == 30
  expected = {0: 4, 9: 4, 10: 2, 14: 2, 15: 1, 29: 1, 30: 1}
  assert {t: s.k_at(t) for t in expected} == expected
  with pytest.raises(ValueError, match="last stage has k=2"):
    npp.Schedule([(4, 1), (2, 1)], 5)


def np_stage_lr(t, n, lr, end_lr, warm, decay):
  """Reference written from the rule: warmup 0 -> lr (first step lr/warm), constant, decay to
  end_lr."""
  if t < warm:
    return lr * (t + 1) / warm
  if t >= n - decay:
    return lr + (end_lr - lr) * (t - (n - decay) + 1) / decay
  return lr


def test_per_stage_learning_rate_at_and_around_boundaries():
  steps_per_epoch = 10
  s = npp.Schedule([(4, 2.0), (2, 2.0), (1, 4.0)], steps_per_epoch)
  lr, end_lr, warmup_epochs, decay_ratio = 1e-4, 1e-5, 0.5, 0.2
  sched = s.learning_rate(lr, end_lr, warmup_epochs, decay_ratio)
  for stage in s.stages:
    n = stage.num_steps
    decay, warm = round(decay_ratio * n), round(warmup_epochs * steps_per_epoch)
    for t in range(n):
      got = float(sched(stage.start_step + t))
      np.testing.assert_allclose(
        got,
        np_stage_lr(t, n, lr, end_lr, warm, decay),
        rtol=1e-6,
        err_msg=f"stage k={stage.k} local step {t}",
      )
  # Around each boundary: the last step of a stage is end_lr, the next step restarts the warmup.
  for a, b in zip(s.stages, s.stages[1:]):
    np.testing.assert_allclose(float(sched(a.end_step - 1)), end_lr, rtol=1e-6)
    np.testing.assert_allclose(float(sched(b.start_step)), lr / 5, rtol=1e-6)
  assert float(sched(0)) > 0


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(lr=0.0), "optim.lr"),
    (dict(lr=-1.0), "optim.lr"),
    (dict(end_lr=1.0), "optim.end_lr"),
    (dict(decay_ratio=1.5), "optim.decay_ratio"),
    (dict(warmup_epochs=-1), "optim.warmup_epochs"),
  ],
)
def test_bad_learning_rate_settings(kwargs, match):
  s = npp.Schedule([(1, 1.0)], 10)
  args = dict(lr=1e-4, end_lr=1e-5, warmup_epochs=0.1, decay_ratio=0.2) | kwargs
  with pytest.raises(ValueError, match=match):
    s.learning_rate(**args)


def test_bad_schedule_inputs():
  with pytest.raises(ValueError, match="steps_per_epoch=0"):
    npp.Schedule([(1, 1.0)], 0)
  with pytest.raises(ValueError, match="epochs=-1"):
    npp.Schedule([(1, -1.0)], 10)
  with pytest.raises(ValueError, match="patch size k=3"):
    npp.Schedule([(3, 1.0), (1, 1.0)], 10)
