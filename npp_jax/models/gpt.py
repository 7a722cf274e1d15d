"""LlamaGen's GPT in Flax Linen, conditioned on a class or on caption features, trainable on patch
tokens (NPP) and on plain tokens.

Layout and conventions follow the PyTorch release so that its checkpoints convert one to one
(NPP.md, "The Llama-style GPT" and "Text to image"): RMSNorm pre-norm blocks, fused bias-free qkv,
SwiGLU, 2D RoPE on interleaved pairs with the condition positions zeroed, zero-initialised output
layer. A class model has one condition position (the class embedding); a text model has
`cls_token_num` (120) positions of projected caption features, a fixed null caption for guidance,
and a padding mask.

Parameters carry logical axis names ("vocab", "embed", "heads", "mlp", ...); `npp_jax.sharding` maps
them to mesh axes with rules from the config, so this file never names a mesh axis.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from npp_jax import npp
from npp_jax import rules

DTYPES = rules.DTYPES
REMAT_POLICIES = {
  "full": None,  # Save nothing: recompute the whole block in the backward pass.
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
CONDITIONS = ("class", "text")


# LlamaGen's GPT sizes: name -> (n_layer, n_head, dim). NPP.md, "Reported results".
MODEL_SIZES = {
  "GPT-B": (12, 12, 768),
  "GPT-L": (24, 16, 1024),
  "GPT-XL": (36, 20, 1280),
  "GPT-XXL": (48, 24, 1536),
  "GPT-XXXL": (48, 40, 2560),
  "GPT-1B": (22, 32, 2048),
  "GPT-3B": (24, 32, 3200),
  "GPT-7B": (32, 32, 4096),
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
  """config.model with its sizes resolved: every rule is checked on construction, so a model built
  from Python and one built from a config file (`from_config`) meet the same one-line errors."""

  n_layer: int
  n_head: int
  dim: int
  n_kv_head: int
  vocab_size: int
  num_classes: int
  grid: tuple[int, int]
  multiple_of: int = 256
  ffn_dim_multiplier: float | None = None
  norm_eps: float = 1e-5
  rope_base: float = 10000.0
  token_dropout: float = 0.1
  resid_dropout: float = 0.1
  ffn_dropout: float = 0.1
  class_dropout: float = 0.1  # Class label (or whole caption) replaced by the null one in training.
  # "class": a label; "text": caption features [cls_token_num, caption_dim].
  condition: str = "class"
  caption_dim: int = 2048  # Width of the caption features (FLAN-T5-XL's); text models only.
  cls_token_num: int = 1  # Condition positions before the image: 1 for a class, 120 for a caption.
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32
  scan_layers: bool = False
  remat: str = "none"

  def __post_init__(self):
    rules.check_fields(self, "model", _RULES)
    for key in ("dtype", "param_dtype"):
      rules.check(f"model.{key}", rules.dtype_name(getattr(self, key)), rules.DTYPE)
    if self.dim % self.n_head or (self.dim // self.n_head) % 4:
      raise ValueError(
        f"model dim={self.dim} with n_head={self.n_head}; expected dim / n_head divisible by 4 "
        "(2D RoPE rotates hd/4 pairs by row and hd/4 by column)"
      )
    if self.n_head % self.n_kv_head:
      raise ValueError(f"model.n_kv_head={self.n_kv_head} does not divide n_head={self.n_head}")
    if self.condition == "class" and self.cls_token_num != 1:
      raise ValueError(
        f"model.cls_token_num={self.cls_token_num} with model.condition='class'; expected 1 (a "
        "class takes one position; 120 is the caption length of model.condition='text')"
      )

  @property
  def head_dim(self) -> int:
    return self.dim // self.n_head

  @property
  def ffn_dim(self) -> int:
    """The release's SwiGLU width: 2/3 of 4*dim, optionally scaled, rounded up to multiple_of."""
    hidden = int(2 * 4 * self.dim / 3)
    if self.ffn_dim_multiplier is not None:
      hidden = int(self.ffn_dim_multiplier * hidden)
    return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

  @classmethod
  def from_config(cls, m: ml_collections.ConfigDict) -> "GPTConfig":
    """From the model section (config.model): sizes from model.name, or model.n_layer / n_head / dim
    with model.name='custom'."""
    config = {"model": m}
    n_layer, n_head, dim = (rules.expect(config, f"model.{f}", _SIZE) for f in _SIZES)
    if m.name == "custom":
      for f, v in zip(_SIZES, (n_layer, n_head, dim)):
        rules.check(f"model.{f}", v, rules.POSITIVE_INT)
    elif m.name in MODEL_SIZES:
      n_layer, n_head, dim = MODEL_SIZES[m.name]
    else:
      raise ValueError(
        f"unknown model.name={m.name!r}; expected one of {sorted(MODEL_SIZES)} or 'custom'"
      )
    rules.expect(config, "model.dtype", rules.DTYPE)
    rules.expect(config, "model.param_dtype", rules.DTYPE)
    fields = rules.section(config, "model", cls, n_layer=n_layer, n_head=n_head, dim=dim)
    grid = fields["grid"]
    return cls(
      **fields
      | {
        "n_kv_head": n_head if m.n_kv_head is None else m.n_kv_head,
        "grid": tuple(grid) if isinstance(grid, (tuple, list)) else grid,
        "dtype": DTYPES[m.dtype],
        "param_dtype": DTYPES[m.param_dtype],
      }
    )


_SIZES = ("n_layer", "n_head", "dim")
_SIZE = (
  "a positive integer (None only with a released model.name)",
  lambda v: v is None or (rules.is_int(v) and v >= 1),
)
_RULES = {
  "n_layer": rules.POSITIVE_INT,
  "n_head": rules.POSITIVE_INT,
  "dim": rules.POSITIVE_INT,
  "n_kv_head": rules.POSITIVE_INT,
  "vocab_size": rules.POSITIVE_INT,
  "num_classes": rules.POSITIVE_INT,
  "grid": rules.PAIR,
  "multiple_of": rules.POSITIVE_INT,
  "ffn_dim_multiplier": rules.optional(rules.POSITIVE),
  "norm_eps": rules.POSITIVE,
  "rope_base": rules.POSITIVE,
  "token_dropout": rules.FRACTION,
  "resid_dropout": rules.FRACTION,
  "ffn_dropout": rules.FRACTION,
  "class_dropout": rules.CLOSED_FRACTION,  # 1 drops every label: an unconditional model.
  "scan_layers": rules.BOOL,
  "remat": rules.one_of("none", *REMAT_POLICIES),
  "condition": (f"one of {CONDITIONS}", lambda v: v in CONDITIONS),
  "caption_dim": rules.POSITIVE_INT,
  "cls_token_num": rules.POSITIVE_INT,
}


def model_inputs(batch: dict, cfg: GPTConfig) -> tuple[Any, dict]:
  """(condition, keyword arguments) of GPT for a batch: a class batch's labels, or a caption batch's
  right-aligned features [B, T, caption_dim] with the mask their lengths make."""
  if cfg.condition != "text":
    return batch["labels"], {}
  t = batch["caption"].shape[1]
  mask = jnp.arange(t)[None, :] >= t - batch["caption_len"][:, None]  # Left padding, LlamaGen's.
  return batch["caption"], {"caption_mask": mask}


# --------------------------------------------------------------------------------------------------
# 2D RoPE.


@functools.lru_cache(maxsize=64)
def rope_2d(
  rows: int, cols: int, head_dim: int, base: float = 10000.0, n_cond: int = 1
) -> np.ndarray:
  """cos/sin table [n_cond + rows*cols, head_dim/2, 2] for the release's 2D RoPE.

  Pair j < hd/4 rotates by the row index, pair hd/4 + j by the column index, both at base^(-4j/hd).
  The condition positions get cos = sin = 0, which zeroes their query and key: the release does this
  (it is not an identity rotation) and converted checkpoints were trained with it.
  """
  quarter = head_dim // 4
  freqs = base ** (-4.0 * np.arange(quarter, dtype=np.float64) / head_dim)
  r = np.repeat(np.arange(rows), cols)  # Row index of each raster position.
  c = np.tile(np.arange(cols), rows)
  angles = np.concatenate([np.outer(r, freqs), np.outer(c, freqs)], axis=-1)  # [rows*cols, hd/2]
  table = np.stack([np.cos(angles), np.sin(angles)], axis=-1)
  table = np.concatenate([np.zeros((n_cond, head_dim // 2, 2)), table], axis=0)
  return table.astype(np.float32)


def apply_rope(x: jax.Array, table: jax.Array) -> jax.Array:
  """Rotate interleaved pairs (x[2j], x[2j+1]) of x [B, S, H, hd] by table [S, hd/2, 2]."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  cos = table[None, :, None, :, 0]
  sin = table[None, :, None, :, 1]
  x0, x1 = xf[..., 0], xf[..., 1]
  out = jnp.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# Layers.


def _dense(features: int, axes: tuple[str, str], cfg: GPTConfig, name: str, zero: bool = False):
  init = nn.initializers.zeros_init() if zero else nn.initializers.normal(0.02)
  return nn.Dense(
    features,
    use_bias=False,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    kernel_init=nn.with_logical_partitioning(init, axes),
    name=name,
  )


class RMSNorm(nn.Module):
  eps: float
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
      (x.shape[-1],),
      self.param_dtype,
    )
    # Normalise in fp32 as the release does, whatever the compute dtype.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return xf.astype(self.dtype) * scale.astype(self.dtype)


class Attention(nn.Module):
  """Causal self-attention. `qkv` and `attend` are separate so a cached decode path can reuse
  both."""

  cfg: GPTConfig
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    self.wqkv = _dense(
      (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, ("embed", "heads"), cfg, "wqkv"
    )
    self.wo = _dense(cfg.dim, ("heads", "embed"), cfg, "wo")
    self.resid_dropout = nn.Dropout(cfg.resid_dropout)

  def qkv(self, x, rope):
    """x [B, S, D] -> rotated q [B, S, H, hd], rotated k and v [B, S, Hkv, hd]."""
    cfg = self.cfg
    b, s, _ = x.shape
    qkv = self.wqkv(x)
    nq, nkv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    q = qkv[..., :nq].reshape(b, s, cfg.n_head, cfg.head_dim)
    k = qkv[..., nq : nq + nkv].reshape(b, s, cfg.n_kv_head, cfg.head_dim)
    v = qkv[..., nq + nkv :].reshape(b, s, cfg.n_kv_head, cfg.head_dim)
    return apply_rope(q, rope), apply_rope(k, rope), v

  def out(self, o):
    """o [B, S, H, hd] -> projected, dropped-out residual branch [B, S, D]."""
    b, s = o.shape[:2]
    return self.resid_dropout(self.wo(o.reshape(b, s, -1)), deterministic=self.deterministic)

  def __call__(self, x, rope, mask=None):
    """mask: None (causal) or bool [B, 1, S, S], True where a query may read a key (text models)."""
    q, k, v = self.qkv(x, rope)
    # Grouped KV heads: query head n reads KV head n // (H / Hkv), as the release's
    # repeat_interleave.
    if mask is None:
      o = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    else:
      o = jax.nn.dot_product_attention(q, k, v, mask=mask)
    return self.out(o)


class FeedForward(nn.Module):
  cfg: GPTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = nn.silu(_dense(cfg.ffn_dim, ("embed", "mlp"), cfg, "w1")(x))
    h = h * _dense(cfg.ffn_dim, ("embed", "mlp"), cfg, "w3")(x)
    h = _dense(cfg.dim, ("mlp", "embed"), cfg, "w2")(h)
    return nn.Dropout(cfg.ffn_dropout)(h, deterministic=self.deterministic)


class Block(nn.Module):
  cfg: GPTConfig
  deterministic: bool = True

  def setup(self):
    cfg = self.cfg
    self.attention_norm = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype)
    self.attention = Attention(cfg, self.deterministic)
    self.ffn_norm = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype)
    self.feed_forward = FeedForward(cfg, self.deterministic)

  def __call__(self, x, rope, mask=None):
    x = x + self.attention(self.attention_norm(x), rope, mask)
    x = x + self.feed_forward(self.ffn_norm(x))
    x = nn.with_logical_constraint(x, ("batch", None, None))
    return x, None  # (carry, output) so the same block runs under nn.scan.


class LabelEmbedder(nn.Module):
  """Class embedding with num_classes + 1 rows; the last row is the null class of guidance."""

  cfg: GPTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, labels):
    cfg = self.cfg
    table = self.param(
      "embedding",
      nn.with_logical_partitioning(nn.initializers.normal(0.02), ("classes", "embed")),
      (cfg.num_classes + 1, cfg.dim),
      cfg.param_dtype,
    )
    if not self.deterministic and cfg.class_dropout > 0:
      drop = jax.random.bernoulli(self.make_rng("dropout"), cfg.class_dropout, labels.shape)
      labels = jnp.where(drop, cfg.num_classes, labels)
    return jnp.take(table, labels, axis=0).astype(cfg.dtype)[:, None, :]  # [B, 1, D]


class CaptionEmbedder(nn.Module):
  """Caption features [B, T, caption_dim] -> [B, T, D] through LlamaGen's bias-free two-layer MLP
  (tanh-approximated GELU), after replacing the captions of `null` rows (and, in training, of a
  class_dropout fraction of rows) by the fixed null caption of guidance.

  The null caption `uncond_embedding` [T, caption_dim] is drawn once at init, N(0, 1) /
  sqrt(caption_dim), and never trained: it is a parameter only so that checkpoints, sharding and
  conversion carry it like any other weight; no gradient reaches it (stop_gradient) and optim.adamw
  zeroes its update. Its rows are not zeroed at padded positions; the caption's padding mask is kept
  for it.
  """

  cfg: GPTConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, caption, null=None):
    """caption [B, T, C] (any float dtype); null: optional bool [B], rows given the null caption."""
    cfg = self.cfg
    b, t, c = caption.shape
    if (t, c) != (cfg.cls_token_num, cfg.caption_dim):
      raise ValueError(
        f"caption features of shape {caption.shape}; expected [batch, model.cls_token_num="
        f"{cfg.cls_token_num}, model.caption_dim={cfg.caption_dim}]"
      )
    uncond = self.param(
      "uncond_embedding",
      nn.with_logical_partitioning(
        nn.initializers.normal(1.0 / np.sqrt(cfg.caption_dim)), ("caption_tokens", "caption")
      ),
      (cfg.cls_token_num, cfg.caption_dim),
      cfg.param_dtype,
    )
    uncond = jax.lax.stop_gradient(uncond)
    drop = jnp.zeros((b,), bool) if null is None else null
    if not self.deterministic and cfg.class_dropout > 0:
      drop = drop | jax.random.bernoulli(self.make_rng("dropout"), cfg.class_dropout, (b,))
    caption = jnp.where(drop[:, None, None], uncond[None].astype(caption.dtype), caption)
    return CaptionMLP(cfg, name="cap_proj")(caption)


class CaptionMLP(nn.Module):
  """`cap_proj` of the release's state dict: fc1 (caption_dim -> dim), tanh GELU, fc2; no biases."""

  cfg: GPTConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    h = _dense(cfg.dim, ("caption", "mlp"), cfg, "fc1")(x)
    return _dense(cfg.dim, ("mlp", "embed"), cfg, "fc2")(nn.gelu(h, approximate=True))


def caption_attention_mask(caption_mask: jax.Array, seq_len: int) -> jax.Array:
  """[B, T] (True: a caption token, False: padding) -> bool [B, 1, S, S] over T text + S - T image
  positions: causal, padded text columns hidden from every query, the diagonal always visible (so a
  padded text row, which sees nothing else, still has a key). NPP.md, "Text to image"."""
  b, t = caption_mask.shape
  pos = jnp.arange(seq_len)
  causal = pos[:, None] >= pos[None, :]
  keys = jnp.concatenate([caption_mask.astype(bool), jnp.ones((b, seq_len - t), bool)], axis=1)
  mask = (causal[None] & keys[:, None, :]) | jnp.eye(seq_len, dtype=bool)[None]
  return mask[:, None]


class GPT(nn.Module):
  """__call__(tokens [B, h, w], cond, patch_size=k) -> logits [B, (h/k)*(w/k), V] (fp32).

  cond: labels [B] (model.condition "class"), or caption features [B, T, caption_dim] left-padded
  with caption_mask [B, T] (True at the caption's tokens; None: no padding) for "text". Output
  position i predicts patch i of the grid cut into k x k patches, read from the last condition
  position on; at k = 1 it is the plain next-token model, and sampling only ever uses k = 1. The
  condition (one class slot or T caption positions) is whole at every k: only the image part is
  aggregated into patches.
  """

  cfg: GPTConfig

  @nn.compact
  def __call__(
    self,
    tokens,
    cond,
    *,
    caption_mask=None,
    null_caption=None,
    patch_size: int = 1,
    train: bool = False,
  ):
    """null_caption: optional bool [B] (text): rows given the null caption (guidance, NLL)."""
    cfg = self.cfg
    b, h, w = tokens.shape
    k = patch_size
    npp.check_patch_size(k, (h, w))
    deterministic = not train
    tok_embeddings = nn.Embed(
      cfg.vocab_size,
      cfg.dim,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
      name="tok_embeddings",
    )
    emb = tok_embeddings(tokens.reshape(b, h * w))
    patches = npp.aggregate(emb, (h, w), k)  # [B, n, D]
    if cfg.condition == "text":
      prefix = CaptionEmbedder(cfg, deterministic, name="cls_embedding")(cond, null_caption)
    else:
      prefix = LabelEmbedder(cfg, deterministic, name="cls_embedding")(cond)
    x = npp.shift_inputs(prefix, patches)  # [B, T + n - 1, D]
    x = nn.Dropout(cfg.token_dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, ("batch", None, None))
    t, s = cfg.cls_token_num, x.shape[1]
    # RoPE runs on the patch grid of this stage, not on the token grid; the T condition rows are 0.
    rope = jnp.asarray(rope_2d(h // k, w // k, cfg.head_dim, cfg.rope_base, n_cond=t))[:s]
    mask = None if caption_mask is None else caption_attention_mask(caption_mask, s)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=nn.broadcast,
        length=cfg.n_layer,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )
      x, _ = stack(cfg, deterministic, name="layers")(x, rope, mask)
    else:
      for i in range(cfg.n_layer):
        x, _ = block(cfg, deterministic, name=f"layers_{i}")(x, rope, mask)

    if t > 1:
      x = x[:, t - 1 :]  # Position T - 1 predicts patch 0; earlier outputs are never scored.
    x = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, name="norm")(x)
    # The release zero-initialises the output layer, so a fresh model predicts a uniform
    # distribution.
    logits = _dense(cfg.vocab_size, ("embed", "vocab"), cfg, "output", zero=True)(x)
    return logits.astype(jnp.float32)


# --------------------------------------------------------------------------------------------------
# Shapes and layouts without allocating.


def abstract_params(cfg: GPTConfig):
  """The params tree as ShapeDtypeStructs wrapped in logical-partitioning boxes (jax.eval_shape)."""
  model = GPT(cfg)
  tokens, cond = example_inputs(cfg)
  return jax.eval_shape(lambda t, c: model.init(jax.random.key(0), t, c), tokens, cond)["params"]


def example_inputs(cfg: GPTConfig, batch: int = 1, zeros: bool = False):
  """(tokens [B, h, w], condition) of the shapes the model takes: ShapeDtypeStructs, or zeros to
  init with. The condition: labels [B] for a class model, caption features [B, T, caption_dim] for
  a text model."""
  h, w = cfg.grid
  shapes = [((batch, h, w), jnp.int32)]
  if cfg.condition == "text":
    shapes.append(((batch, cfg.cls_token_num, cfg.caption_dim), jnp.float32))
  else:
    shapes.append(((batch,), jnp.int32))
  make = jnp.zeros if zeros else jax.ShapeDtypeStruct
  return tuple(make(shape, dtype) for shape, dtype in shapes)


def param_shapes(model_config: ml_collections.ConfigDict):
  """{path: shape} of the unscanned layout for a config, without allocating any parameter."""
  cfg = dataclasses.replace(GPTConfig.from_config(model_config), scan_layers=False)
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(cfg)))[0]
  return {"/".join(str(p.key) for p in path): tuple(x.shape) for path, x in flat}


def count_params(cfg: GPTConfig) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(abstract_params(cfg))))


def stack_layers(params: dict, n_layer: int) -> dict:
  """Unscanned layout (layers_0 .. layers_{n-1}) -> scanned layout (layers, leading axis n)."""
  params = dict(params)
  layers = [params.pop(f"layers_{i}") for i in range(n_layer)]
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
  return params


def unstack_layers(params: dict) -> dict:
  """Scanned layout -> unscanned layout; the identity on an unscanned tree."""
  if "layers" not in params:
    return params
  params = dict(params)
  stacked = params.pop("layers")
  n = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(n):
    params[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return params


# --------------------------------------------------------------------------------------------------
# KV-cache decoding: the same parameters (unscanned layout), one chunk of positions at a time.
#
# Calibration on CPU (NPP.md): caches stacked over layers made XLA copy the whole cache every token,
# so each layer owns its cache, updated in place with dynamic_update_slice. Caches are laid out [B,
# Hkv, T, hd] so that both attention matmuls have their batch dimensions leading and read the cache
# without a transpose.


# Logical axes of each cache, named as parameters name theirs: the sampler splits caches by the same
# rules as the weights (the batch over data and fsdp, the KV heads over tensor).
CACHE_AXES = ("batch", "heads", None, None)


def cache_length(cfg: GPTConfig) -> int:
  """Positions a sampling cache holds: the T condition positions, every grid token but the last."""
  return cfg.cls_token_num + cfg.grid[0] * cfg.grid[1] - 1


def init_cache(cfg: GPTConfig, batch: int, length: int, dtype=None) -> tuple:
  """Per-layer (k, v) caches of zeros, each [batch, n_kv_head, length, head_dim]."""
  shape = (batch, cfg.n_kv_head, length, cfg.head_dim)
  dtype = dtype or cfg.dtype
  return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layer))


def _attend(q, keys, values, pos, cfg: GPTConfig, text_mask=None):
  """q [B, S, H, hd] at positions pos.. over cache entries keys/values [B, Hkv, T, hd] ->
  [B, S, H, hd].

  text_mask: None (class models: causal), or bool [B, T_text] of a text model's caption positions
  (True: a caption token): padded caption keys are hidden from every query, but a query always
  sees its own key, as `caption_attention_mask` does in the full forward pass."""
  b, s = q.shape[:2]
  t = keys.shape[2]
  group = cfg.n_head // cfg.n_kv_head
  # Query head n reads KV head n // group, as in the full forward pass.
  qg = q.reshape(b, s, cfg.n_kv_head, group, cfg.head_dim).transpose(
    0, 2, 3, 1, 4
  )  # [B, Hkv, G, S, hd]
  qg = qg.reshape(b, cfg.n_kv_head, group * s, cfg.head_dim)
  scores = jnp.einsum("bkqd,bktd->bkqt", qg, keys, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / np.sqrt(cfg.head_dim))
  query_pos = pos + jnp.tile(jnp.arange(s), group)  # Row g*S + i of qg is position pos + i.
  key_pos = jnp.arange(t)
  visible = key_pos[None, :] <= query_pos[:, None]  # [G*S, T]
  if text_mask is not None:
    keys_ok = jnp.concatenate(
      [text_mask.astype(bool), jnp.ones((b, t - text_mask.shape[1]), bool)], axis=1
    )  # [B, T]
    diagonal = key_pos[None, :] == query_pos[:, None]
    visible = ((visible[None] & keys_ok[:, None, :]) | diagonal[None])[:, None]  # [B, 1, G*S, T]
  scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
  o = jnp.einsum("bkqt,bktd->bkqd", probs, values)  # [B, Hkv, G*S, hd]
  o = o.reshape(b, cfg.n_kv_head, group, s, cfg.head_dim).transpose(0, 3, 1, 2, 4)
  return o.reshape(b, s, cfg.n_head, cfg.head_dim)


def _cached_attention(attention: Attention, x, rope, cache, pos, text_mask=None):
  """x [B, S, D] at positions pos .. pos+S-1 -> (residual branch [B, S, D], updated (k, v) cache).

  Attention reads the whole cache and masks the entries past the current position. Reading only the
  filled prefix (a lax.switch over static prefix lengths, or a loop over cache chunks with an online
  softmax) measured slower on CPU: the prefix slices are copies, and the loop adds more than it
  saves.
  """
  cfg = attention.cfg
  q, k, v = attention.qkv(x, rope)
  k_cache, v_cache = cache
  # Write first, then read: XLA updates the loop-carried buffer in place.
  k_cache = jax.lax.dynamic_update_slice(
    k_cache, k.transpose(0, 2, 1, 3).astype(k_cache.dtype), (0, 0, pos, 0)
  )
  v_cache = jax.lax.dynamic_update_slice(
    v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), (0, 0, pos, 0)
  )
  o = _attend(q, k_cache, v_cache, pos, cfg, text_mask)
  return attention.out(o), (k_cache, v_cache)


class Decoder(nn.Module):
  """GPT's parameters run incrementally against per-layer KV caches (sampling; always k = 1).

  Parameter names match GPT's unscanned layout, so `Decoder(cfg).apply({"params":
  unstack_layers(p)}, ...)`
  takes a trained GPT's parameters. Positions 0 .. T-1 hold the condition (T = cls_token_num: the
  class embedding, or the caption's T projected features), position T - 1 + t (t >= 1) holds token
  t - 1 of the raster-order grid, and the output at position T - 1 + t predicts token t. A cache
  holds T + n - 1 positions (`cache_length`).
  """

  cfg: GPTConfig

  def setup(self):
    cfg = self.cfg
    self.tok_embeddings = nn.Embed(
      cfg.vocab_size,
      cfg.dim,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
    )
    if cfg.condition == "text":
      self.cls_embedding = CaptionEmbedder(cfg)
    else:
      self.cls_embedding = LabelEmbedder(cfg)
    self.layers = [Block(cfg) for _ in range(cfg.n_layer)]  # Named layers_0 .. layers_{n-1}.
    self.norm = RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype)
    self.output = nn.Dense(
      cfg.vocab_size,
      use_bias=False,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed", "vocab")),
    )

  def embed_tokens(self, tokens):
    """tokens [B, S] -> [B, S, D]."""
    return self.tok_embeddings(tokens)

  def embed_class(self, labels):
    """labels [B] (num_classes = the null class) -> [B, 1, D]."""
    return self.cls_embedding(labels)

  def embed_caption(self, caption, null=None):
    """caption features [B, T, caption_dim] (left-padded), null: optional bool [B] (rows given the
    null caption of guidance) -> [B, T, D]."""
    return self.cls_embedding(caption, null)

  def __call__(self, x, cache, pos, text_mask=None):
    """x [B, S, D] embeddings at positions pos .. pos+S-1 -> (logits [B, S, V] fp32, updated cache).

    S = 1 is one decode step; S > 1 fills several positions at once (a prefill). pos may be traced.
    text_mask: a text model's caption mask bool [B, T] (True: a caption token; see `_attend`),
    given at every call; None for class models (and for a caption without padding).
    """
    cfg = self.cfg
    s = x.shape[1]
    table = rope_2d(*cfg.grid, cfg.head_dim, cfg.rope_base, n_cond=cfg.cls_token_num)
    rope = jax.lax.dynamic_slice_in_dim(jnp.asarray(table), pos, s)
    new_cache = []
    for layer, layer_cache in zip(self.layers, cache):
      h, layer_cache = _cached_attention(
        layer.attention, layer.attention_norm(x), rope, layer_cache, pos, text_mask
      )
      x = x + h
      x = x + layer.feed_forward(layer.ffn_norm(x))
      new_cache.append(layer_cache)
    logits = self.output(self.norm(x))
    return logits.astype(jnp.float32), tuple(new_cache)
