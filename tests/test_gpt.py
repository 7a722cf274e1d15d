"""The Linen GPT against a NumPy forward pass written here, RoPE against NumPy, sizes, gradients, layouts."""

import chex
import flax.linen as nn
from helpers import random_params  # noqa: E402  (tests/ is on sys.path)
from helpers import tiny_model_config  # noqa: E402  (tests/ is on sys.path)
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from npp_jax import config_lib
from npp_jax import costs
from npp_jax import npp
from npp_jax.models import gpt

# ------------------------------------------------------------------------------------------ NumPy reference


def np_rope_table(rows, cols, hd, base=10000.0):
  """Written from NPP.md: pairs j < hd/4 use the row index, the rest the column index; condition zero."""
  table = np.zeros((1 + rows * cols, hd // 2, 2))
  for pos in range(rows * cols):
    r, c = divmod(pos, cols)
    for j in range(hd // 2):
      idx, jj = (r, j) if j < hd // 4 else (c, j - hd // 4)
      angle = idx * base ** (-4.0 * jj / hd)
      table[1 + pos, j] = np.cos(angle), np.sin(angle)
  return table


def np_rope(x, table):  # x [S, H, hd]
  out = np.empty_like(x)
  for s in range(x.shape[0]):
    for j in range(x.shape[2] // 2):
      cos, sin = table[s, j]
      a, b = x[s, :, 2 * j], x[s, :, 2 * j + 1]
      out[s, :, 2 * j], out[s, :, 2 * j + 1] = a * cos - b * sin, b * cos + a * sin
  return out


def np_rmsnorm(x, scale, eps=1e-5):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * scale


def np_forward(p, cfg, tokens, label, k):
  """One sequence through the model in float64: aggregate, shift, blocks, logits."""
  h, w = cfg.grid
  hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
  emb = p["tok_embeddings"]["embedding"][tokens.reshape(-1)]
  rows, cols = h // k, w // k
  patches = np.stack(
    [
      emb.reshape(h, w, -1)[r * k : (r + 1) * k, c * k : (c + 1) * k].mean((0, 1))
      for r in range(rows)
      for c in range(cols)
    ]
  )
  x = np.concatenate([p["cls_embedding"]["embedding"][label][None], patches[:-1]])
  table = np_rope_table(rows, cols, hd)[: x.shape[0]]
  s = x.shape[0]
  for i in range(cfg.n_layer):
    lp = p[f"layers_{i}"]
    y = np_rmsnorm(x, lp["attention_norm"]["scale"])
    qkv = y @ lp["attention"]["wqkv"]["kernel"]
    q = qkv[:, : nh * hd].reshape(s, nh, hd)
    kk = qkv[:, nh * hd : (nh + nkv) * hd].reshape(s, nkv, hd)
    v = qkv[:, (nh + nkv) * hd :].reshape(s, nkv, hd)
    q, kk = np_rope(q, table), np_rope(kk, table)
    rep = nh // nkv
    kk, v = np.repeat(kk, rep, axis=1), np.repeat(v, rep, axis=1)  # repeat_interleave
    scores = np.einsum("shd,thd->hst", q, kk) / np.sqrt(hd)
    scores = np.where(np.tril(np.ones((s, s), bool))[None], scores, -np.inf)
    att = np.exp(scores - scores.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum("hst,thd->shd", att, v).reshape(s, -1)
    x = x + o @ lp["attention"]["wo"]["kernel"]
    y = np_rmsnorm(x, lp["ffn_norm"]["scale"])
    ff = lp["feed_forward"]
    a = y @ ff["w1"]["kernel"]
    x = x + ((a / (1 + np.exp(-a))) * (y @ ff["w3"]["kernel"])) @ ff["w2"]["kernel"]
  return np_rmsnorm(x, p["norm"]["scale"]) @ p["output"]["kernel"]


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("rows, cols, hd", [(16, 16, 64), (4, 8, 16)])
def test_rope_table_matches_numpy(rows, cols, hd):
  got = gpt.rope_2d(rows, cols, hd, 10000.0)
  np.testing.assert_allclose(got, np_rope_table(rows, cols, hd), atol=1e-6)
  np.testing.assert_array_equal(got[0], 0.0)  # The condition position: cos = sin = 0.


def test_apply_rope_matches_numpy_and_zeroes_condition():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, 1 + 12, 3, 16)).astype(np.float32)
  table = gpt.rope_2d(3, 4, 16)
  got = np.asarray(gpt.apply_rope(jnp.asarray(x), jnp.asarray(table)))
  np.testing.assert_allclose(got[0], np_rope(x[0].astype(np.float64), table), atol=1e-5)
  np.testing.assert_array_equal(got[0, 0], 0.0)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_forward_matches_numpy_reference(k, n_kv_head):
  cfg = gpt.GPTConfig.from_config(tiny_model_config(n_kv_head=n_kv_head))
  model, params = random_params(cfg)
  rng = np.random.default_rng(k)
  tokens = rng.integers(0, cfg.vocab_size, size=(2, 8, 8)).astype(np.int32)
  labels = np.array([3, 7], np.int32)
  logits = model.apply({"params": params}, jnp.asarray(tokens), jnp.asarray(labels), patch_size=k)
  chex.assert_shape(logits, (2, npp.num_patches(cfg.grid, k), cfg.vocab_size))
  chex.assert_type(logits, jnp.float32)
  p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  for b in range(2):
    ref = np_forward(p64, cfg, tokens[b], labels[b], k)
    # fp32 through two layers vs float64: relative 1e-4 of the logit scale.
    np.testing.assert_allclose(np.asarray(logits[b]), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_scan_and_remat_give_the_same_function():
  cfg = gpt.GPTConfig.from_config(tiny_model_config())
  model, params = random_params(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 8, 8), 0, cfg.vocab_size)
  labels = jnp.array([1, 2])
  ref = model.apply({"params": params}, tokens, labels, patch_size=2)
  scanned = gpt.GPT(gpt.GPTConfig.from_config(tiny_model_config(scan_layers=True, remat="dots")))
  stacked = gpt.stack_layers(params, cfg.n_layer)
  got = scanned.apply({"params": stacked}, tokens, labels, patch_size=2)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_equal(gpt.unstack_layers(stacked), params)


def test_parameter_counts_of_every_release_size():
  # Release counts with vocab 16384 and 1000 classes (B: 110.9M as LlamaGen reports 111M).
  expected_m = {
    "GPT-B": 110.9,
    "GPT-L": 342.9,
    "GPT-XL": 774.7,
    "GPT-XXL": 1411.0,
    "GPT-XXXL": 3893.0,
    "GPT-1B": 1199.6,
    "GPT-3B": 3096.7,
    "GPT-7B": 6614.6,
  }
  for name, (n_layer, n_head, dim) in gpt.MODEL_SIZES.items():
    cfg = gpt.GPTConfig.from_config(config_lib.model_config(name))
    n = gpt.count_params(cfg)  # jax.eval_shape: no memory.
    # Independent count from the layout in NPP.md.
    f = cfg.ffn_dim
    layer = dim * 3 * dim + dim * dim + 3 * dim * f + 2 * dim
    by_hand = 16384 * dim * 2 + 1001 * dim + n_layer * layer + dim
    assert n == by_hand, name
    assert round(n / 1e6, 1) == expected_m[name], (name, n)


def test_abstract_params_carry_logical_axes():
  cfg = gpt.GPTConfig.from_config(config_lib.model_config("GPT-B"))
  specs = nn.get_partition_spec(gpt.abstract_params(cfg))
  assert tuple(specs["tok_embeddings"]["embedding"]) == ("vocab", "embed")
  assert tuple(specs["layers_0"]["attention"]["wqkv"]["kernel"]) == ("embed", "heads")
  assert tuple(specs["layers_0"]["feed_forward"]["w2"]["kernel"]) == ("mlp", "embed")
  scan_cfg = gpt.GPTConfig(**{**cfg.__dict__, "scan_layers": True})
  specs = nn.get_partition_spec(gpt.abstract_params(scan_cfg))
  assert tuple(specs["layers"]["attention"]["wqkv"]["kernel"]) == ("layers", "embed", "heads")


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_gradients_finite_and_nonzero_at_every_k(k):
  m = tiny_model_config(grid=(16, 16), dtype="bfloat16")
  cfg = gpt.GPTConfig.from_config(m)
  model = gpt.GPT(cfg)
  tokens = jax.random.randint(jax.random.key(k), (2, 16, 16), 0, cfg.vocab_size)
  labels = jnp.array([0, 9])
  params = nn.unbox(model.init(jax.random.key(0), tokens, labels)["params"])

  def loss_fn(p):
    logits = model.apply(
      {"params": p}, tokens, labels, patch_size=k, train=True, rngs={"dropout": jax.random.key(1)}
    )
    return npp.patch_loss(logits, npp.group_targets(tokens, k))

  loss, grads = jax.value_and_grad(loss_fn)(params)
  # Zero output layer: the first loss is exactly log(V).
  np.testing.assert_allclose(float(loss), np.log(cfg.vocab_size), rtol=1e-3)
  chex.assert_tree_all_finite(grads)
  assert float(optax.global_norm(grads)) > 0
  # With a zero output layer only it gets gradient at first; one SGD step must reach every parameter.
  params2 = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  grads2 = jax.grad(loss_fn)(params2)
  for path, g in jax.tree_util.tree_flatten_with_path(grads2)[0]:
    assert float(jnp.abs(g.astype(jnp.float32)).max()) > 0, jax.tree_util.keystr(path)


def test_label_drop_uses_null_class_only_in_training():
  cfg = gpt.GPTConfig.from_config(tiny_model_config(class_dropout=1.0))
  model, params = random_params(cfg)
  tokens = jax.random.randint(jax.random.key(1), (2, 8, 8), 0, cfg.vocab_size)
  null = jnp.full((2,), cfg.num_classes)
  ref_null = model.apply({"params": params}, tokens, null)
  dropped = gpt.GPT(cfg).apply(
    {"params": params}, tokens, jnp.array([1, 2]), train=True, rngs={"dropout": jax.random.key(0)}
  )
  # All dropouts on (prob 1) would change activations too; compare the first position, which sees
  # only the (dropped) class embedding through attention to itself.
  cfg0 = gpt.GPTConfig(
    **{**cfg.__dict__, "token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0}
  )
  dropped = gpt.GPT(cfg0).apply(
    {"params": params}, tokens, jnp.array([1, 2]), train=True, rngs={"dropout": jax.random.key(0)}
  )
  np.testing.assert_allclose(np.asarray(dropped), np.asarray(ref_null), rtol=1e-5, atol=1e-5)
  kept = gpt.GPT(cfg0).apply({"params": params}, tokens, jnp.array([1, 2]))
  assert not np.allclose(np.asarray(kept), np.asarray(ref_null))


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("name", "GPT-Z", "unknown model.name='GPT-Z'"),
    ("n_kv_head", 5, "n_kv_head=5"),
    ("dtype", "int8", "model.dtype='int8'"),
    ("remat", "some", "model.remat='some'"),
  ],
)
def test_bad_model_config(field, value, match):
  m = config_lib.model_config("GPT-B")
  m[field] = value
  with pytest.raises(ValueError, match=match):
    gpt.GPTConfig.from_config(m)


def test_step_flops_match_xla_cost_analysis():
  """Our FLOP accounting against XLA's own count of the compiled train step (tiny model)."""
  cfg = gpt.GPTConfig.from_config(tiny_model_config(grid=(16, 16), n_layer=2, dim=64, n_head=4))
  model = gpt.GPT(cfg)
  tokens = jax.random.randint(jax.random.key(0), (4, 16, 16), 0, cfg.vocab_size)
  labels = jnp.arange(4)
  params = nn.unbox(model.init(jax.random.key(0), tokens, labels)["params"])
  for k in (1, 2, 4):

    def loss_fn(p):
      return npp.patch_loss(
        model.apply({"params": p}, tokens, labels, patch_size=k), npp.group_targets(tokens, k)
      )

    analysis = jax.jit(jax.grad(loss_fn)).lower(params).compile().cost_analysis()
    xla = analysis[0]["flops"] if isinstance(analysis, list) else analysis["flops"]
    ours = costs.train_step_flops(cfg, k, 4).total
    # XLA also counts elementwise work (norms, softmax, silu) that we leave out: within 35%.
    assert 0.65 < ours / xla < 1.35, (k, ours, xla)
