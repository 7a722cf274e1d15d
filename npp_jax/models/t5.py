"""The FLAN-T5 encoder (T5 v1.1 layout) in Flax Linen: LlamaGen's caption encoder.

What a Hugging Face T5 checkpoint depends on (NPP.md, "Text to image"): relative position buckets
(bidirectional, `num_buckets` over `max_distance`) whose bias is learned in the first layer and
added to the scores of every layer; T5's RMS norm (no mean, no bias); attention scores NOT scaled by
1/sqrt(d_kv) (T5 folds that into its initialisation); a gated-GELU FFN with the tanh approximation
(HF's `gelu_new`); no biases anywhere; a final norm. Dropout is left out: the encoder only ever runs
frozen.

Parameters carry logical axis names as models/gpt.py does ("vocab", "embed", "heads", "mlp",
"norm"), so the config's rules place them on the mesh. `params_from_hf` maps a Hugging Face state
dict (names as `T5EncoderModel` / `T5ForConditionalGeneration` save them) to this module's tree.
"""

import dataclasses
import functools
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from npp_jax.models.gpt import DTYPES
from npp_jax.models.gpt import RMSNorm


@dataclasses.dataclass(frozen=True)
class T5Config:
  d_model: int
  d_kv: int
  num_heads: int
  num_layers: int
  d_ff: int
  vocab_size: int
  num_buckets: int = 32
  max_distance: int = 128
  eps: float = 1e-6
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  @property
  def inner_dim(self) -> int:
    return self.num_heads * self.d_kv

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], where: str = "config.json", **dtypes) -> "T5Config":
    """From a Hugging Face T5 config.json (as a dict); `dtype`/`param_dtype` as names or jnp
    dtypes."""
    proj = hf.get("feed_forward_proj", "relu")
    if proj != "gated-gelu":
      raise ValueError(
        f"{where} has feed_forward_proj={proj!r}; expected 'gated-gelu' (FLAN-T5 / T5 v1.1)"
      )
    fields = {
      "d_model": hf.get("d_model"),
      "d_kv": hf.get("d_kv"),
      "num_heads": hf.get("num_heads"),
      "num_layers": hf.get("num_layers"),
      "d_ff": hf.get("d_ff"),
      "vocab_size": hf.get("vocab_size"),
      "num_buckets": hf.get("relative_attention_num_buckets", 32),
      "max_distance": hf.get("relative_attention_max_distance", 128),  # Absent in older configs.
    }
    for key, value in fields.items():
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        hf_key = {"num_buckets": "relative_attention_num_buckets"}.get(key, key)
        hf_key = {"max_distance": "relative_attention_max_distance"}.get(hf_key, hf_key)
        raise ValueError(f"{where} has {hf_key}={value!r}; expected a positive integer")
    eps = hf.get("layer_norm_epsilon", 1e-6)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
      raise ValueError(f"{where} has layer_norm_epsilon={eps!r}; expected a positive number")
    return cls(**fields, eps=float(eps), **_dtypes(**dtypes))


def _dtypes(dtype="bfloat16", param_dtype="float32") -> dict:
  out = {}
  for key, value in (("dtype", dtype), ("param_dtype", param_dtype)):
    if isinstance(value, str):
      if value not in DTYPES:
        raise ValueError(f"text encoder {key}={value!r}; expected one of {sorted(DTYPES)}")
      value = DTYPES[value]
    out[key] = value
  return out


# --------------------------------------------------------------------------------------------------
# Relative positions.


@functools.lru_cache(maxsize=16)
def relative_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """Bucket [query, key] of the offset key - query, T5's bidirectional scheme.

  Half the buckets are for keys after the query. In each half, offsets below a quarter of all
  buckets get a bucket each; larger ones share buckets spaced logarithmically up to max_distance,
  beyond which everything falls in the last bucket.
  """
  offset = np.arange(length)[None, :] - np.arange(length)[:, None]
  half = num_buckets // 2
  exact = half // 2
  distance = np.abs(offset)
  # float32 as Hugging Face computes it, so that offsets on a bucket edge round the same way. The
  # maximum(1) only avoids log(0) where `distance < exact` picks the exact bucket anyway.
  ratio = np.maximum(distance, 1).astype(np.float32) / np.float32(exact)
  steps = (np.log(ratio) / math.log(max_distance / exact) * np.float32(half - exact)).astype(
    np.int64
  )
  far = np.minimum(exact + steps, half - 1)
  bucket = np.where(distance < exact, distance, far)
  return (bucket + (offset > 0) * half).astype(np.int32)


# --------------------------------------------------------------------------------------------------
# Layers.


def _dense(features: int, axes: tuple[str, str], cfg: T5Config, name: str) -> nn.Dense:
  return nn.Dense(
    features,
    use_bias=False,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.d_model**-0.5), axes),
    name=name,
  )


class SelfAttention(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x, bias):
    """x [B, T, D], bias [B or 1, H, T, T] (positions + padding mask) -> [B, T, D]."""
    cfg = self.cfg
    b, t, _ = x.shape
    heads = lambda name: _dense(cfg.inner_dim, ("embed", "heads"), cfg, name)(x).reshape(
      b, t, cfg.num_heads, cfg.d_kv
    )
    q, k, v = heads("q"), heads("k"), heads("v")
    # No 1/sqrt(d_kv): T5 scales its query initialisation instead, and checkpoints are trained so.
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
    probs = jax.nn.softmax(scores, axis=-1).astype(cfg.dtype)
    o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, cfg.inner_dim)
    return _dense(cfg.d_model, ("heads", "embed"), cfg, "o")(o)


class FeedForward(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    gate = nn.gelu(_dense(cfg.d_ff, ("embed", "mlp"), cfg, "wi_0")(x), approximate=True)
    h = gate * _dense(cfg.d_ff, ("embed", "mlp"), cfg, "wi_1")(x)
    return _dense(cfg.d_model, ("mlp", "embed"), cfg, "wo")(h)


class Layer(nn.Module):
  cfg: T5Config

  @nn.compact
  def __call__(self, x, bias):
    cfg = self.cfg
    x = x + SelfAttention(cfg, name="attention")(
      RMSNorm(cfg.eps, cfg.dtype, cfg.param_dtype, name="attention_norm")(x), bias
    )
    x = x + FeedForward(cfg, name="feed_forward")(
      RMSNorm(cfg.eps, cfg.dtype, cfg.param_dtype, name="ffn_norm")(x)
    )
    return nn.with_logical_constraint(x, ("batch", None, None))


class T5Encoder(nn.Module):
  """__call__(ids int [B, T], mask bool [B, T]) -> last hidden states float32 [B, T, d_model].

  Padded positions (mask False) are hidden as keys from every query; their own rows are computed as
  Hugging Face computes them, and callers keep only the first `mask.sum()` rows of a caption.
  """

  cfg: T5Config

  @nn.compact
  def __call__(self, ids, mask):
    cfg = self.cfg
    t = ids.shape[1]
    embed = nn.Embed(
      cfg.vocab_size,
      cfg.d_model,
      dtype=cfg.dtype,
      param_dtype=cfg.param_dtype,
      embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
      name="shared",
    )
    x = nn.with_logical_constraint(embed(ids), ("batch", None, None))
    # One position bias for all layers (learned in the first layer of the HF model), plus the mask.
    table = self.param(
      "relative_attention_bias",
      nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "heads")),
      (cfg.num_buckets, cfg.num_heads),
      cfg.param_dtype,
    )
    buckets = relative_buckets(t, cfg.num_buckets, cfg.max_distance)
    position = jnp.take(table.astype(jnp.float32), jnp.asarray(buckets), axis=0)  # [T, T, H]
    hidden = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
    bias = position.transpose(2, 0, 1)[None] + hidden  # [B, H, T, T]
    for i in range(cfg.num_layers):
      x = Layer(cfg, name=f"layers_{i}")(x, bias)
    x = RMSNorm(cfg.eps, cfg.dtype, cfg.param_dtype, name="final_norm")(x)
    return x.astype(jnp.float32)


def abstract_params(cfg: T5Config, length: int = 8):
  """The params tree as ShapeDtypeStructs in logical-partitioning boxes (jax.eval_shape)."""
  ids = jax.ShapeDtypeStruct((1, length), jnp.int32)
  mask = jax.ShapeDtypeStruct((1, length), jnp.bool_)
  model = T5Encoder(cfg)
  return jax.eval_shape(lambda i, m: model.init(jax.random.key(0), i, m), ids, mask)["params"]


# --------------------------------------------------------------------------------------------------
# Hugging Face names.


def hf_names(cfg: T5Config) -> dict[str, tuple[tuple[str, ...], bool]]:
  """{HF state-dict name: (path in our params tree, transpose)} of every encoder weight.

  PyTorch Linear weights are [out, in], a Flax kernel is [in, out]. The token embedding is
  `shared.weight` (tied with `encoder.embed_tokens.weight`, which some files hold instead).
  """
  names = {
    "shared.weight": (("shared", "embedding"), False),
    "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
      ("relative_attention_bias",),
      False,
    ),
    "encoder.final_layer_norm.weight": (("final_norm", "scale"), False),
  }
  for i in range(cfg.num_layers):
    hf, ours = f"encoder.block.{i}.layer.", f"layers_{i}"
    for p in "qkvo":
      names[f"{hf}0.SelfAttention.{p}.weight"] = ((ours, "attention", p, "kernel"), True)
    names[f"{hf}0.layer_norm.weight"] = ((ours, "attention_norm", "scale"), False)
    for p in ("wi_0", "wi_1", "wo"):
      names[f"{hf}1.DenseReluDense.{p}.weight"] = ((ours, "feed_forward", p, "kernel"), True)
    names[f"{hf}1.layer_norm.weight"] = ((ours, "ffn_norm", "scale"), False)
  return names


EMBED_ALIAS = "encoder.embed_tokens.weight"


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: T5Config, where: str) -> dict:
  """A HF state dict (at least the encoder's names; others ignored) -> our params, in
  cfg.param_dtype.

  Shapes are checked against cfg first: one-line ValueError naming the first missing or misshapen
  weight.
  """
  from flax import traverse_util

  expected = {
    path: x.shape for path, x in traverse_util.flatten_dict(nn.unbox(abstract_params(cfg))).items()
  }
  flat = {}
  for name, (path, transpose) in hf_names(cfg).items():
    x = tensors.get(name)
    if x is None and name == "shared.weight":
      x = tensors.get(EMBED_ALIAS)
    if x is None:
      raise ValueError(
        f"{where}: the T5 weights have no {name!r}; expected a T5 encoder checkpoint"
      )
    x = np.asarray(x)
    want = expected[path][::-1] if transpose else expected[path]
    if x.shape != want:
      raise ValueError(f"{where}: {name} has shape {x.shape}; its config.json gives {want}")
    if transpose:
      x = x.T
    flat[path] = x.astype(cfg.param_dtype)
  return traverse_util.unflatten_dict(flat)
