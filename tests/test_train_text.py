"""The trainer's step on caption batches (data/captions.py's layout: right-aligned caption features,
their lengths, a valid flag): the loss is the patch loss over the valid examples of the whole global
batch at every k and under gradient accumulation, invalid examples change nothing, the null caption
stays fixed through AdamW and the EMA, and the held-out NLL counts valid rows only.

References: the loss and NLL recomputed in NumPy from the model's logits on the valid rows alone.
Tolerances: fp32 on CPU, 1e-5 relative for one forward, 1e-4 where XLA sums in another order.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support.configs import tiny_model_config
from support.weights import random_params

from npp_jax import config_lib
from npp_jax import optim
from npp_jax import sharding
from npp_jax.evaluators import heldout_nll
from npp_jax.jobs import train
from npp_jax.models import gpt

T, C = 6, 12  # Caption positions and width of the tiny text model.


def text_cfg(**kw):
  m = tiny_model_config(condition="text", cls_token_num=T, caption_dim=C, **kw)
  return gpt.GPTConfig.from_config(m)


def deterministic_cfg():
  # No dropout of any kind: the step is then a function of the batch alone, comparable across runs.
  zero = dict(token_dropout=0.0, resid_dropout=0.0, ffn_dropout=0.0, class_dropout=0.0)
  return text_cfg(**zero)


def caption_batch(cfg, n, seed, valid=None):
  """A caption batch as data/captions.py yields it: features right-aligned, zeros before them."""
  rng = np.random.default_rng(seed)
  h, w = cfg.grid
  lengths = rng.integers(1, T + 1, size=n).astype(np.int32)
  rows = np.arange(T)[None, :] >= T - lengths[:, None]
  caption = rng.normal(size=(n, T, C)).astype(np.float32) * rows[..., None]
  valid = rng.random(n) < 0.7 if valid is None else np.asarray(valid, bool)
  return {
    "codes": jnp.asarray(rng.integers(0, cfg.vocab_size, size=(n, h, w)), jnp.int32),
    "caption": jnp.asarray(caption, jnp.bfloat16),
    "caption_len": jnp.asarray(lengths),
    "valid": jnp.asarray(valid),
  }


def random_state(model, cfg, tx, ema=False):
  init_fn, rng = train.init_state(model, tx, cfg, 0, ema=ema)
  state = nn.unbox(init_fn(rng))
  # Every weight random (the output layer starts at zero, a uniform prediction hiding everything).
  _, params = random_params(cfg)
  params["cls_embedding"]["uncond_embedding"] = state.params["cls_embedding"]["uncond_embedding"]
  return state.replace(params=params, opt_state=tx.init(params), ema=params if ema else ())


_STEPS = {}  # One compiled step per (tx, k, accum, ema_decay): the tests share them.


def step_fn(model, tx, k, accum, ema_decay=0.0):
  key = (id(model), id(tx), k, accum, ema_decay)
  if key not in _STEPS:
    _STEPS[key] = jax.jit(
      functools.partial(
        train.train_step,
        model=model,
        tx=tx,
        lr_fn=lambda s: 1.0,
        k=k,
        accum=accum,
        ema_decay=ema_decay,
      )
    )
  return _STEPS[key]


@pytest.fixture(scope="module")
def sgd():
  """The deterministic model, SGD at rate 1 and a random state: shared by the tests that only read
  them (jit steps are pure functions of the state), so that they compile each step once."""
  cfg = deterministic_cfg()
  model, tx = gpt.GPT(cfg), optax.sgd(1.0)
  return cfg, model, tx, random_state(model, cfg, tx)


def np_patch_loss(logits, codes, k):
  """Per example: mean over positions of logsumexp - mean_i logits[t_i] (NPP.md, patch loss)."""
  logits = np.asarray(logits, np.float64)
  b, h, w = codes.shape
  blocks = codes.reshape(b, h // k, k, w // k, k).transpose(0, 1, 3, 2, 4).reshape(b, -1, k * k)
  m = logits.max(-1, keepdims=True)
  lse = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
  picked = np.take_along_axis(logits, blocks, axis=-1).mean(-1)
  return (lse - picked).mean(-1)


def reference_loss(model, params, batch, k):
  """The mean patch loss of the valid examples, each run through the model on its own mask."""
  valid = np.asarray(batch["valid"])
  sub = {key: np.asarray(v)[valid] for key, v in batch.items()}
  cond, kw = gpt.model_inputs(sub, model.cfg)
  logits = model.apply({"params": params}, jnp.asarray(sub["codes"]), cond, **kw, patch_size=k)
  return np_patch_loss(logits, sub["codes"], k).mean()


@pytest.mark.parametrize("k", [1, 2, 4])
def test_text_step_loss_is_the_patch_loss_of_the_valid_examples(k, sgd):
  cfg, model, tx, state = sgd
  batch = caption_batch(cfg, 8, seed=k, valid=[1, 0, 1, 1, 0, 1, 1, 1])
  _, metrics = step_fn(model, tx, k, accum=1)(state, batch)
  want = reference_loss(model, state.params, batch, k)
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  everyone = reference_loss(model, state.params, {**batch, "valid": jnp.ones(8, bool)}, k)
  assert abs(everyone - want) > 1e-4 * want  # Counting the invalid rows fails the test above.


def test_invalid_examples_change_nothing_and_accumulation_equals_the_big_batch(sgd):
  cfg, model, tx, state = sgd
  # Micro-batch i takes rows i, i + 2, i + 4, i + 6: the valid ones fall 3 and 0 to a micro-batch.
  valid = np.array([1, 0, 1, 0, 1, 0, 0, 0], bool)
  batch = caption_batch(cfg, 8, seed=3, valid=valid)
  s1, m1 = step_fn(model, tx, 2, accum=1)(state, batch)
  other = caption_batch(cfg, 8, seed=4)
  scrambled = {
    key: jnp.where(jnp.asarray(valid).reshape((8,) + (1,) * (v.ndim - 1)), v, other[key])
    for key, v in batch.items()
    if key != "valid"
  }
  s1b, m1b = step_fn(model, tx, 2, accum=1)(state, {**scrambled, "valid": batch["valid"]})
  assert float(m1b["loss"]) == float(m1["loss"])
  jax.tree.map(np.testing.assert_array_equal, s1b.params, s1.params)
  s4, m4 = step_fn(model, tx, 2, accum=2)(state, batch)
  np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
    s4.params,
    s1.params,
  )


def test_a_batch_without_valid_examples_has_zero_loss_and_no_update(sgd):
  cfg, model, tx, state = sgd
  new, metrics = step_fn(model, tx, 2, accum=2)(state, caption_batch(cfg, 8, 0, valid=[0] * 8))
  assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)


def test_null_caption_fixed_through_adamw_caption_drop_and_the_ema():
  cfg = text_cfg(class_dropout=0.5)  # Half the rows take the null caption: it is in the graph.
  model = gpt.GPT(cfg)
  tx = optim.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.05, grad_clip=1.0)
  state = random_state(model, cfg, tx, ema=True)
  null = np.asarray(state.params["cls_embedding"]["uncond_embedding"])
  step = step_fn(model, tx, 2, accum=1, ema_decay=0.9)
  for i in range(3):
    state, metrics = step(state, caption_batch(cfg, 8, seed=10 + i))
    assert np.isfinite(float(metrics["loss"]))
  for tree in (state.params, state.ema):
    np.testing.assert_array_equal(np.asarray(tree["cls_embedding"]["uncond_embedding"]), null)
  assert not np.allclose(
    state.params["cls_embedding"]["cap_proj"]["fc2"]["kernel"],
    random_state(model, cfg, tx).params["cls_embedding"]["cap_proj"]["fc2"]["kernel"],
  )


def test_eval_step_averages_valid_rows_with_the_caption_and_the_null_caption(sgd):
  cfg, model, _, state = sgd
  params = state.params
  batch = caption_batch(cfg, 6, seed=7, valid=[1, 1, 0, 1, 1, 1])
  batch["mask"] = jnp.asarray([1, 1, 1, 1, 0, 1], bool)  # Row 4 pads the last eval batch.
  metrics = jax.jit(functools.partial(heldout_nll.eval_step, model=model, num_classes=0))(
    params, batch
  )
  out = jax.device_get(metrics.compute())
  rows = np.array([1, 1, 0, 1, 0, 1], bool)
  codes = np.asarray(batch["codes"])
  cond, kw = gpt.model_inputs(batch, cfg)
  nll = {}  # Per image, nats per token.
  for key, extra in (("nll", {}), ("null", {"null_caption": jnp.ones(6, bool)})):
    logits = model.apply({"params": params}, batch["codes"], cond, **kw, **extra)
    nll[key] = np_patch_loss(logits, codes, 1)[rows]
  np.testing.assert_allclose(float(out["nll"]), nll["nll"].mean(), rtol=1e-5)
  tokens = cfg.grid[0] * cfg.grid[1]
  info = ((nll["null"] - nll["nll"]) * tokens).mean()
  np.testing.assert_allclose(float(out["class_info"]), info, rtol=1e-4, atol=1e-4)
  assert abs(info) > 1e-2  # The caption matters to this model: the comparison is not vacuous.


def test_text_step_on_a_2x2x2_mesh_equals_one_device(sgd):
  """State sharded by the config's logical-axis rules, the caption batch over data x fsdp."""
  cfg, model, tx, state = sgd
  batch = caption_batch(cfg, 8, seed=11, valid=[1, 1, 0, 1, 1, 1, 0, 1])
  want_state, want = step_fn(model, tx, 2, accum=2)(state, batch)
  mesh_config = config_lib.base_config().mesh
  mesh_config.shape = (2, 2, 2)
  mesh, rules = sharding.make_mesh(mesh_config), sharding.axis_rules(mesh_config)
  init_fn, rng = train.init_state(model, tx, cfg, 0, ema=False)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state_sharding = sharding.logical_shardings(jax.eval_shape(init_fn, rng), mesh, rules)
    fn = functools.partial(train.train_step, model=model, tx=tx, lr_fn=lambda s: 1.0, k=2, accum=2)
    step = jax.jit(
      fn,
      in_shardings=(state_sharding, sharding.data_sharding(mesh)),
      out_shardings=(state_sharding, None),
    )
    got_state, got = step(jax.device_put(state, state_sharding), sharding.global_batch(batch, mesh))
  assert got_state.params["layers_0"]["attention"]["wqkv"]["kernel"].sharding.spec != (None, None)
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6),
    got_state.params,
    want_state.params,
  )
