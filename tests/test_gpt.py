"""The Linen GPT against a NumPy forward pass written here, RoPE against NumPy, sizes, gradients,
layouts."""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from support.configs import tiny_model_config
from support.weights import random_params

from npp_jax import config_lib
from npp_jax import costs
from npp_jax import npp
from npp_jax import optim
from npp_jax.models import gpt

# ---------------------------------------------------------------------------------- NumPy reference


def np_rope_table(rows, cols, hd, base=10000.0):
  """Written from NPP.md: pairs j < hd/4 use the row index, the rest the column index; condition
  zero."""
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


def np_patches(p, cfg, tokens, k):
  """Mean token embedding of every k x k block of one grid [h, w], blocks in raster order."""
  h, w = cfg.grid
  emb = p["tok_embeddings"]["embedding"][tokens.reshape(-1)].reshape(h, w, -1)
  return np.stack(
    [
      emb[r * k : (r + 1) * k, c * k : (c + 1) * k].mean((0, 1))
      for r in range(h // k)
      for c in range(w // k)
    ]
  )


def np_transformer(p, cfg, x, table, visible):
  """Blocks, final norm and output layer on one sequence x [S, D]; visible [S, S] (query, key)."""
  hd, nh, nkv = cfg.head_dim, cfg.n_head, cfg.n_kv_head
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
    scores = np.where(visible[None], scores, -np.inf)
    att = np.exp(scores - scores.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    o = np.einsum("hst,thd->shd", att, v).reshape(s, -1)
    x = x + o @ lp["attention"]["wo"]["kernel"]
    y = np_rmsnorm(x, lp["ffn_norm"]["scale"])
    ff = lp["feed_forward"]
    a = y @ ff["w1"]["kernel"]
    x = x + ((a / (1 + np.exp(-a))) * (y @ ff["w3"]["kernel"])) @ ff["w2"]["kernel"]
  return np_rmsnorm(x, p["norm"]["scale"]) @ p["output"]["kernel"]


def np_forward(p, cfg, tokens, label, k):
  """One sequence through the model in float64: aggregate, shift, blocks, logits."""
  h, w = cfg.grid
  x = np.concatenate(
    [p["cls_embedding"]["embedding"][label][None], np_patches(p, cfg, tokens, k)[:-1]]
  )
  table = np_rope_table(h // k, w // k, cfg.head_dim)[: x.shape[0]]
  s = x.shape[0]
  return np_transformer(p, cfg, x, table, np.tril(np.ones((s, s), bool)))


# -------------------------------------------------------------------------------------------- tests


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
  # With a zero output layer only it gets gradient at first; one SGD step must reach every
  # parameter.
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


# ---------------------------------------------------------------------------------- text condition
#
# NPP.md, "Text to image": caption features through a bias-free MLP (tanh GELU) fill T condition
# positions whose RoPE rows are zero; padded caption columns are hidden from every query except on
# the diagonal; logits are read from position T - 1 on. The test model: T = 6 caption positions of
# width 12.

T, C = 6, 12


def text_config(**kw):
  return gpt.GPTConfig.from_config(
    tiny_model_config(condition="text", cls_token_num=T, caption_dim=C, **kw)
  )


def np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_forward_text(p, cfg, tokens, caption, valid, k):
  """One sequence of a text model in float64: caption [T, C] left-padded, valid [T] bool."""
  h, w = cfg.grid
  mlp = p["cls_embedding"]["cap_proj"]
  prefix = np_gelu_tanh(caption @ mlp["fc1"]["kernel"]) @ mlp["fc2"]["kernel"]
  x = np.concatenate([prefix, np_patches(p, cfg, tokens, k)[:-1]])
  s = x.shape[0]
  # T zero rows in front of the patch grid's table (np_rope_table has one).
  table = np.concatenate(
    [np.zeros((T - 1, cfg.head_dim // 2, 2)), np_rope_table(h // k, w // k, cfg.head_dim)]
  )
  visible = np.zeros((s, s), bool)
  for q in range(s):
    for key in range(q + 1):
      visible[q, key] = key >= T or valid[key] or key == q
  return np_transformer(p, cfg, x, table[:s], visible)[T - 1 :]


def text_batch(cfg, seed=0, lengths=(2, T, 4)):
  """Tokens, left-padded captions (zeros before the caption, as the data layout) and their masks."""
  rng = np.random.default_rng(seed)
  b = len(lengths)
  tokens = rng.integers(0, cfg.vocab_size, size=(b, *cfg.grid)).astype(np.int32)
  valid = np.arange(T)[None, :] >= T - np.asarray(lengths)[:, None]
  caption = rng.normal(size=(b, T, C)).astype(np.float32) * valid[..., None]
  return tokens, caption, valid


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_text_forward_matches_numpy_reference(k, n_kv_head):
  cfg = text_config(n_kv_head=n_kv_head)
  model, params = random_params(cfg)
  tokens, caption, valid = text_batch(cfg, seed=k)
  logits = model.apply(
    {"params": params}, tokens, caption, caption_mask=jnp.asarray(valid), patch_size=k
  )
  chex.assert_shape(logits, (3, npp.num_patches(cfg.grid, k), cfg.vocab_size))
  chex.assert_type(logits, jnp.float32)
  p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  for b in range(3):
    ref = np_forward_text(p64, cfg, tokens[b], caption[b].astype(np.float64), valid[b], k)
    np.testing.assert_allclose(np.asarray(logits[b]), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_text_patch_loss_over_valid_samples(k):
  """The trainer's loss for text: image patches only, every valid sample counted once."""
  cfg = text_config()
  model, params = random_params(cfg)
  tokens, caption, valid = text_batch(cfg, seed=10 + k, lengths=(3, 1, T, 5))
  sample_ok = np.array([True, False, True, True])
  logits = model.apply({"params": params}, tokens, caption, caption_mask=valid, patch_size=k)
  targets = npp.group_targets(jnp.asarray(tokens), k)
  n = targets.shape[1]
  got = npp.patch_loss(logits, targets, jnp.broadcast_to(jnp.asarray(sample_ok)[:, None], (4, n)))
  p64 = jax.tree.map(lambda x: np.asarray(x, np.float64), params)
  per_sample = []
  for b in np.flatnonzero(sample_ok):
    ref = np_forward_text(p64, cfg, tokens[b], caption[b].astype(np.float64), valid[b], k)
    logp = ref - ref.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    # Patch i's k*k tokens, raster order inside the block; -(1/k^2) sum log p.
    grid = tokens[b]
    rows, cols = cfg.grid[0] // k, cfg.grid[1] // k
    nll = [
      -np.mean([logp[i, t] for t in grid[r * k : (r + 1) * k, c * k : (c + 1) * k].reshape(-1)])
      for i, (r, c) in enumerate((r, c) for r in range(rows) for c in range(cols))
    ]
    per_sample.append(np.mean(nll))
  np.testing.assert_allclose(float(got), np.mean(per_sample), rtol=1e-5)


def test_text_loss_at_k1_is_next_token_cross_entropy():
  """NPP.md's t2i formulation at k = 1: logits from the last caption position on predict image
  tokens 0 .. N-1; cross-entropy averaged over the tokens of the valid samples only."""
  cfg = text_config()
  model, params = random_params(cfg)
  tokens, caption, valid = text_batch(cfg, seed=3, lengths=(2, 4))
  sample_ok = np.array([False, True])
  logits = model.apply({"params": params}, tokens, caption, caption_mask=valid)
  mask = jnp.broadcast_to(jnp.asarray(sample_ok)[:, None], logits.shape[:2])
  got = npp.patch_loss(logits, npp.group_targets(jnp.asarray(tokens), 1), mask)
  flat = tokens.reshape(2, -1)
  lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
  picked = np.take_along_axis(np.asarray(logits, np.float64), flat[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(got), (lse - picked)[1].mean(), rtol=1e-6)


def test_padded_caption_rows_change_nothing_and_condition_rows_are_zero_rope():
  cfg = text_config()
  model, params = random_params(cfg)
  tokens, caption, valid = text_batch(cfg, seed=5)
  ref = model.apply({"params": params}, tokens, caption, caption_mask=valid, patch_size=2)
  noise = np.random.default_rng(1).normal(size=caption.shape).astype(np.float32)
  noisy = caption + 3.0 * noise * ~valid[..., None]
  got = model.apply({"params": params}, tokens, noisy, caption_mask=valid, patch_size=2)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # The padding mask matters: unmasked, the padding would be read.
  unmasked = model.apply({"params": params}, tokens, noisy, patch_size=2)
  assert not np.allclose(np.asarray(unmasked), np.asarray(ref), atol=1e-3)
  table = gpt.rope_2d(4, 4, cfg.head_dim, n_cond=T)
  np.testing.assert_array_equal(table[:T], 0.0)
  np.testing.assert_allclose(table[T:], np_rope_table(4, 4, cfg.head_dim)[1:], atol=1e-6)


def test_caption_attention_mask_matches_the_rule():
  valid = np.array([[False, False, True], [True, True, True]])
  got = np.asarray(gpt.caption_attention_mask(jnp.asarray(valid), 5))
  chex.assert_shape(got, (2, 1, 5, 5))
  for b in range(2):
    for q in range(5):
      for key in range(5):
        want = (key <= q and (key >= 3 or valid[b, key])) or key == q
        assert got[b, 0, q, key] == want, (b, q, key)


def test_caption_drop_uses_the_null_caption_with_the_caption_mask():
  cfg = text_config(class_dropout=1.0)
  cfg0 = gpt.GPTConfig(
    **{**cfg.__dict__, "token_dropout": 0.0, "resid_dropout": 0.0, "ffn_dropout": 0.0}
  )
  model, params = random_params(cfg0)
  tokens, caption, valid = text_batch(cfg0, seed=7)
  null = np.broadcast_to(np.asarray(params["cls_embedding"]["uncond_embedding"]), caption.shape)
  ref = model.apply({"params": params}, tokens, null, caption_mask=valid)
  dropped = model.apply(
    {"params": params},
    tokens,
    caption,
    caption_mask=valid,
    train=True,
    rngs={"dropout": jax.random.key(0)},
  )
  np.testing.assert_allclose(np.asarray(dropped), np.asarray(ref), rtol=1e-5, atol=1e-5)
  forced = model.apply(
    {"params": params}, tokens, caption, caption_mask=valid, null_caption=jnp.array([1, 0, 1], bool)
  )
  np.testing.assert_allclose(np.asarray(forced[::2]), np.asarray(ref[::2]), rtol=1e-5, atol=1e-5)
  kept = model.apply({"params": params}, tokens, caption, caption_mask=valid)
  np.testing.assert_allclose(np.asarray(forced[1]), np.asarray(kept[1]), rtol=1e-5, atol=1e-5)
  assert not np.allclose(np.asarray(kept[0]), np.asarray(ref[0]), atol=1e-3)


def test_null_caption_init_and_it_is_never_trained():
  cfg = gpt.GPTConfig.from_config(
    tiny_model_config(condition="text", cls_token_num=120, caption_dim=256, class_dropout=0.5)
  )
  model = gpt.GPT(cfg)
  params = nn.unbox(model.init(jax.random.key(0), *gpt.example_inputs(cfg, zeros=True))["params"])
  null = np.asarray(params["cls_embedding"]["uncond_embedding"], np.float64)
  chex.assert_shape(null, (120, 256))
  # N(0, 1) / sqrt(caption_dim): 30,720 draws, std within 2% of 1/16 and mean near 0.
  assert abs(null.std() * 16 - 1) < 0.02 and abs(null.mean()) < 0.002
  tx = optim.adamw(1e-2, b1=0.9, b2=0.95, weight_decay=0.05, grad_clip=1.0)
  state = tx.init(params)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(4, 8, 8)), jnp.int32)
  caption = jnp.asarray(rng.normal(size=(4, 120, 256)), jnp.bfloat16)

  @jax.jit
  def step(params, state, key):
    def loss_fn(p):
      logits = model.apply(
        {"params": p}, tokens, caption, patch_size=2, train=True, rngs={"dropout": key}
      )
      return npp.patch_loss(logits, npp.group_targets(tokens, 2))

    grads = jax.grad(loss_fn)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, grads

  start = params
  for i in range(3):
    params, state, grads = step(params, state, jax.random.key(i))
  assert not np.any(np.asarray(grads["cls_embedding"]["uncond_embedding"]))
  np.testing.assert_array_equal(
    np.asarray(params["cls_embedding"]["uncond_embedding"]),
    np.asarray(start["cls_embedding"]["uncond_embedding"]),
  )
  # Everything else did train, the caption MLP included.
  assert not np.allclose(
    params["cls_embedding"]["cap_proj"]["fc1"]["kernel"],
    start["cls_embedding"]["cap_proj"]["fc1"]["kernel"],
  )
  assert optim.frozen_mask(params)["cls_embedding"]["uncond_embedding"] is True
  assert optim.decay_mask(params)["cls_embedding"]["uncond_embedding"] is False


def test_text_scan_and_remat_give_the_same_function():
  cfg = text_config()
  model, params = random_params(cfg)
  tokens, caption, valid = text_batch(cfg, seed=2)
  ref = model.apply({"params": params}, tokens, caption, caption_mask=valid, patch_size=2)
  scanned = gpt.GPT(dataclasses.replace(cfg, scan_layers=True, remat="full"))
  got = scanned.apply(
    {"params": gpt.stack_layers(params, cfg.n_layer)},
    tokens,
    caption,
    caption_mask=valid,
    patch_size=2,
  )
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_text_parameter_count_of_gpt_xl():
  """LlamaGen's t2i GPT-XL: the class table replaced by the caption MLP and the null caption."""
  m = config_lib.model_config("GPT-XL")
  m.condition, m.cls_token_num = "text", 120
  cfg = gpt.GPTConfig.from_config(m)
  d = 1280
  layer = d * 3 * d + d * d + 3 * d * cfg.ffn_dim + 2 * d
  by_hand = 16384 * d * 2 + 2048 * d + d * d + 120 * 2048 + 36 * layer + d
  assert gpt.count_params(cfg) == by_hand
  assert round(by_hand / 1e6, 1) == 777.9  # The class model's 774.7M - class table + caption MLP.


@pytest.mark.parametrize(
  "field, value, match",
  [
    ("condition", "image", "model.condition='image'"),
    ("cls_token_num", 120, "model.cls_token_num=120 with model.condition='class'"),
    ("caption_dim", 0, "model.caption_dim=0"),
  ],
)
def test_bad_condition_config(field, value, match):
  m = config_lib.model_config("GPT-B")
  m[field] = value
  with pytest.raises(ValueError, match=match):
    gpt.GPTConfig.from_config(m)


def test_caption_of_the_wrong_shape_is_one_error():
  cfg = text_config()
  model, params = random_params(cfg)
  tokens, caption, _ = text_batch(cfg)
  with pytest.raises(
    ValueError, match=r"expected \[batch, model.cls_token_num=6, model.caption_dim=12\]"
  ):
    model.apply({"params": params}, tokens, caption[:, :, :8])
