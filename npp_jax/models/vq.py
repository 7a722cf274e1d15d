"""LlamaGen's VQ tokenizer (VQ-16 by default) in Flax Linen: encoder, L2-normalised codebook,
decoder.

Module names follow the PyTorch release one to one ("conv_blocks_3/res_1/norm1" is
`conv_blocks.3.res.1.norm1`), so `npp_jax.convert` maps checkpoints by renaming alone (NPP.md,
"The VQ-16 tokenizer"). Images are NHWC in [-1, 1]; codes are int32 [B, h, w].

  model = VQModel(VQConfig.from_config(config.vq))
  codes = encode_fn(params, images, cfg)          # jitted, pure: callers shard the batch; uint8 or
  [-1, 1] images = decode_fn(params, codes, cfg)
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from npp_jax import rules

# uint8 -> [-1, 1] as the release's ToTensor + Normalize(0.5, 0.5): (p / 255 - 0.5) / 0.5 in fp32. A
# table gathered on device: XLA turns the division into a multiplication that differs in the last
# bit.
PIXEL_VALUES = (
  (np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
).astype(np.float32)


def to_float(images: jax.Array) -> jax.Array:
  """uint8 pixels -> fp32 in [-1, 1], bit for bit the release's preprocessing."""
  return jnp.take(jnp.asarray(PIXEL_VALUES), images.astype(jnp.int32), axis=0)


@dataclasses.dataclass(frozen=True)
class VQConfig:
  codebook_size: int = 16384
  codebook_embed_dim: int = 8
  z_channels: int = 256
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  norm_groups: int = 32
  norm_eps: float = 1e-6
  dropout: float = 0.0
  image_size: int = 256
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  commit_beta: float = 0.25
  codebook_weight: float = 1.0
  entropy_loss_ratio: float = 0.0
  entropy_temperature: float = 0.01

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def grid(self) -> tuple[int, int]:
    """Code grid of an image_size x image_size image."""
    return (self.image_size // self.downsample,) * 2

  def __post_init__(self):
    rules.check_fields(self, "vq", _RULES)
    for key in ("dtype", "param_dtype"):
      rules.check(f"vq.{key}", rules.dtype_name(getattr(self, key)), rules.DTYPE)
    bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % self.norm_groups]
    if bad:
      raise ValueError(
        f"vq.ch={self.ch} with ch_mult={self.ch_mult} gives {bad} channels; expected multiples "
        f"of vq.norm_groups={self.norm_groups}"
      )
    if self.image_size % self.downsample:
      raise ValueError(
        f"vq.image_size={self.image_size}; expected a multiple of the downsampling factor "
        f"{self.downsample}"
      )

  @classmethod
  def from_config(cls, v: ml_collections.ConfigDict) -> "VQConfig":
    """From the tokenizer's section (config.vq)."""
    config = {"vq": v}
    for key in ("dtype", "param_dtype"):
      rules.expect(config, f"vq.{key}", rules.DTYPE)
    fields = rules.section(config, "vq", cls)
    ch_mult = fields["ch_mult"]
    return cls(
      **fields
      | {
        "ch_mult": tuple(ch_mult) if isinstance(ch_mult, (tuple, list)) else ch_mult,
        "dtype": rules.DTYPES[v.dtype],
        "param_dtype": rules.DTYPES[v.param_dtype],
      }
    )


_RULES = {
  "codebook_size": rules.POSITIVE_INT,
  "codebook_embed_dim": rules.POSITIVE_INT,
  "z_channels": rules.POSITIVE_INT,
  "ch": rules.POSITIVE_INT,
  "ch_mult": (
    "a non-empty tuple of positive integers",
    lambda v: isinstance(v, tuple) and len(v) > 0 and all(rules.is_int(m) and m >= 1 for m in v),
  ),
  "num_res_blocks": rules.POSITIVE_INT,
  "norm_groups": rules.POSITIVE_INT,
  "norm_eps": rules.POSITIVE,
  "dropout": rules.FRACTION,
  "image_size": rules.POSITIVE_INT,
  "commit_beta": rules.NON_NEGATIVE,
  "codebook_weight": rules.NON_NEGATIVE,
  "entropy_loss_ratio": rules.NON_NEGATIVE,
  "entropy_temperature": rules.POSITIVE,
}


# --------------------------------------------------------------------------------------------------
# Building blocks.


def _conv(
  cfg: VQConfig, features: int, kernel: int, name: str, strides: int = 1, padding: Any = "SAME"
):
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=strides,
    padding=padding,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    name=name,
  )


def _norm(cfg: VQConfig, name: str):
  # Two-pass variance as PyTorch computes it: E[x^2] - E[x]^2 loses digits on large activations.
  return nn.GroupNorm(
    num_groups=cfg.norm_groups,
    epsilon=cfg.norm_eps,
    dtype=cfg.dtype,
    param_dtype=cfg.param_dtype,
    use_fast_variance=False,
    name=name,
  )


class ResnetBlock(nn.Module):
  cfg: VQConfig
  features: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg = self.cfg
    h = _conv(cfg, self.features, 3, "conv1")(nn.swish(_norm(cfg, "norm1")(x)))
    h = nn.swish(_norm(cfg, "norm2")(h))
    h = nn.Dropout(cfg.dropout)(h, deterministic=not train)
    h = _conv(cfg, self.features, 3, "conv2")(h)
    if x.shape[-1] != self.features:
      x = _conv(cfg, self.features, 1, "nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all h*w positions, 1x1 convolutions for q, k, v and the
  output."""

  cfg: VQConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    b, h, w, c = x.shape
    y = _norm(cfg, "norm")(x)
    q, k, v = (_conv(cfg, c, 1, n)(y).reshape(b, h * w, c) for n in ("q", "k", "v"))
    logits = jnp.einsum("bic,bjc->bij", q, k).astype(jnp.float32) * c**-0.5
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c)
    return x + _conv(cfg, c, 1, "proj_out")(out)


class Downsample(nn.Module):
  cfg: VQConfig

  @nn.compact
  def __call__(self, x):
    # The release pads right and bottom only, then convolves with stride 2 and no padding.
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return _conv(self.cfg, x.shape[-1], 3, "conv", strides=2, padding="VALID")(x)


class Upsample(nn.Module):
  cfg: VQConfig

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # Nearest neighbour x2.
    return _conv(self.cfg, x.shape[-1], 3, "conv")(x)


class Level(nn.Module):
  """One resolution: res blocks, each followed by attention when `attention`, then an optional
  resampler."""

  cfg: VQConfig
  features: int
  num_blocks: int
  attention: bool
  resample: str | None  # "down", "up" or None.

  @nn.compact
  def __call__(self, x, train: bool = False):
    for j in range(self.num_blocks):
      x = ResnetBlock(self.cfg, self.features, name=f"res_{j}")(x, train)
      if self.attention:
        x = AttnBlock(self.cfg, name=f"attn_{j}")(x)
    if self.resample == "down":
      x = Downsample(self.cfg, name="downsample")(x)
    elif self.resample == "up":
      x = Upsample(self.cfg, name="upsample")(x)
    return x


def _mid(cfg: VQConfig, x, train: bool):
  """res, attn, res at the lowest resolution, named mid_0..2 inside the calling module."""
  c = x.shape[-1]
  x = ResnetBlock(cfg, c, name="mid_0")(x, train)
  x = AttnBlock(cfg, name="mid_1")(x)
  return ResnetBlock(cfg, c, name="mid_2")(x, train)


class Encoder(nn.Module):
  """[B, H, W, 3] -> [B, H/f, W/f, z_channels]; attention only at the last (lowest) level and in
  mid."""

  cfg: VQConfig

  @nn.compact
  def __call__(self, x, train: bool = False):
    cfg = self.cfg
    n = len(cfg.ch_mult)
    x = _conv(cfg, cfg.ch, 3, "conv_in")(x.astype(cfg.dtype))
    for i, mult in enumerate(cfg.ch_mult):
      x = Level(
        cfg,
        cfg.ch * mult,
        cfg.num_res_blocks,
        attention=i == n - 1,
        resample="down" if i < n - 1 else None,
        name=f"conv_blocks_{i}",
      )(x, train)
    x = _mid(cfg, x, train)
    x = nn.swish(_norm(cfg, "norm_out")(x))
    return _conv(cfg, cfg.z_channels, 3, "conv_out")(x)


class Decoder(nn.Module):
  """[B, h, w, z_channels] -> [B, h*f, w*f, 3]; conv_blocks_0 is the lowest resolution and alone
  attends."""

  cfg: VQConfig

  @nn.compact
  def __call__(self, z, train: bool = False):
    cfg = self.cfg
    n = len(cfg.ch_mult)
    x = _conv(cfg, cfg.ch * cfg.ch_mult[-1], 3, "conv_in")(z.astype(cfg.dtype))
    x = _mid(cfg, x, train)
    for i, mult in enumerate(reversed(cfg.ch_mult)):
      # The release's decoder has one res block more per level than its encoder.
      x = Level(
        cfg,
        cfg.ch * mult,
        cfg.num_res_blocks + 1,
        attention=i == 0,
        resample="up" if i < n - 1 else None,
        name=f"conv_blocks_{i}",
      )(x, train)
    x = nn.swish(_norm(cfg, "norm_out")(x))
    return _conv(cfg, 3, 3, "conv_out")(x)


# --------------------------------------------------------------------------------------------------
# Quantizer.


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """x / max(|x|, eps) along the last axis, as torch.nn.functional.normalize."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, eps)


def take_rows(table: jax.Array, idx: jax.Array) -> jax.Array:
  """table[idx] whose rows follow idx's sharding; meshes with explicit axes need it spelled out."""
  sharding = jax.typeof(idx).sharding
  if any(s is not None for s in sharding.spec):
    out = jax.sharding.NamedSharding(
      sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec, None)
    )
    return table.at[idx].get(out_sharding=out)
  return jnp.take(table, idx, axis=0)


def _codebook_init(key, shape, dtype):
  # The release draws U(-1/n, 1/n) and then stores the rows L2-normalised.
  table = jax.random.uniform(key, shape, jnp.float32, -1.0 / shape[0], 1.0 / shape[0])
  return l2_normalize(table).astype(dtype)


def entropy_loss(affinity: jax.Array, temperature: float) -> jax.Array:
  """Mean per-sample entropy minus entropy of the mean distribution of softmax(affinity / T)."""
  logits = affinity.reshape(-1, affinity.shape[-1]) / temperature
  probs = jax.nn.softmax(logits, axis=-1)
  log_probs = jax.nn.log_softmax(logits + 1e-5, axis=-1)
  avg_probs = probs.mean(axis=0)
  avg_entropy = -jnp.sum(avg_probs * jnp.log(avg_probs + 1e-5))
  sample_entropy = -jnp.mean(jnp.sum(probs * log_probs, axis=-1))
  return sample_entropy - avg_entropy


class VectorQuantizer(nn.Module):
  """Nearest L2-normalised codebook row of each L2-normalised vector, in fp32 whatever the compute
  dtype."""

  cfg: VQConfig

  def setup(self):
    cfg = self.cfg
    self.embedding = self.param(
      "embedding", _codebook_init, (cfg.codebook_size, cfg.codebook_embed_dim), cfg.param_dtype
    )

  def codebook(self) -> jax.Array:
    return l2_normalize(self.embedding.astype(jnp.float32))

  def lookup(self, codes: jax.Array) -> jax.Array:
    """codes [...] -> normalised code vectors [..., e]."""
    return take_rows(self.codebook(), codes)

  def __call__(self, z: jax.Array):
    """z [B, h, w, e] -> (codes [B, h, w] int32, straight-through vectors [B, h, w, e] fp32,
    losses)."""
    cfg = self.cfg
    z = l2_normalize(z.astype(jnp.float32))
    emb = self.codebook()
    flat = z.reshape(-1, z.shape[-1])
    # HIGHEST: on accelerators the default fp32 matmul precision would change which code is nearest.
    dots = jnp.einsum("nd,kd->nk", flat, emb, precision=jax.lax.Precision.HIGHEST)
    dist = (
      jnp.sum(flat * flat, axis=1, keepdims=True) + jnp.sum(emb * emb, axis=1)[None] - 2.0 * dots
    )
    codes = jnp.argmin(dist, axis=1).astype(jnp.int32)
    z_q = take_rows(emb, codes).reshape(z.shape)
    sg = jax.lax.stop_gradient
    losses = {
      "codebook": cfg.codebook_weight * jnp.mean((z_q - sg(z)) ** 2),
      "commitment": cfg.commit_beta * jnp.mean((sg(z_q) - z) ** 2),
    }
    if cfg.entropy_loss_ratio > 0:  # Static: the [N, codebook_size] softmax costs nothing when off.
      losses["entropy"] = cfg.entropy_loss_ratio * entropy_loss(-dist, cfg.entropy_temperature)
    else:
      losses["entropy"] = jnp.zeros((), jnp.float32)
    losses["quantizer"] = losses["codebook"] + losses["commitment"] + losses["entropy"]
    # Straight-through estimator: forward uses the code vector, backward treats quantization as
    # identity.
    quantized = z + sg(z_q - z)
    return codes.reshape(z.shape[:-1]), quantized, losses


# --------------------------------------------------------------------------------------------------
# The model.


class VQModel(nn.Module):
  """encode: images -> codes; decode_codes: codes -> images; __call__: the training forward pass."""

  cfg: VQConfig

  def setup(self):
    cfg = self.cfg
    self.encoder = Encoder(cfg)
    self.decoder = Decoder(cfg)
    self.quant_conv = _conv(cfg, cfg.codebook_embed_dim, 1, "quant_conv")
    self.post_quant_conv = _conv(cfg, cfg.z_channels, 1, "post_quant_conv")
    self.quantize = VectorQuantizer(cfg)

  def _check_images(self, images):
    f = self.cfg.downsample
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % f or images.shape[2] % f:
      raise ValueError(
        f"images of shape {tuple(images.shape)}; expected [B, H, W, 3] with H and W "
        f"multiples of the downsampling factor {f}"
      )

  def encode(self, images, train: bool = False):
    """images [B, H, W, 3] in [-1, 1] -> (codes [B, H/f, W/f] int32, quantized [.., e] fp32,
    losses).

    `quantized` carries the straight-through gradient to the encoder; `losses` holds "codebook",
    "commitment", "entropy" (already weighted by the config) and their sum "quantizer".
    """
    self._check_images(images)
    return self.quantize(self.quant_conv(self.encoder(images, train)))

  def decode(self, quantized, train: bool = False):
    """Code vectors [B, h, w, e] -> images [B, h*f, w*f, 3] fp32."""
    x = self.post_quant_conv(quantized.astype(self.cfg.dtype))
    return self.decoder(x, train).astype(jnp.float32)

  def decode_codes(self, codes, train: bool = False):
    """codes [B, h, w] int -> images [B, h*f, w*f, 3] fp32 (unclipped, roughly in [-1, 1])."""
    if codes.ndim != 3:
      raise ValueError(f"codes of shape {tuple(codes.shape)}; expected [B, h, w]")
    return self.decode(self.quantize.lookup(codes), train)

  def __call__(self, images, train: bool = False):
    """Training forward: (reconstruction [B, H, W, 3] fp32, codes [B, h, w], losses); rng
    "dropout"."""
    codes, quantized, losses = self.encode(images, train)
    return self.decode(quantized, train), codes, losses


# --------------------------------------------------------------------------------------------------
# Pure jitted entry points and shapes.


@functools.partial(jax.jit, static_argnames=("cfg",))
def encode_fn(params, images: jax.Array, cfg: VQConfig) -> jax.Array:
  """params (the "params" collection), images [B, H, W, 3] -> codes [B, h, w] int32.

  uint8 images are mapped to [-1, 1] as the release does (`to_float`); float images are taken as
  they are.
  """
  if images.dtype == jnp.uint8:
    images = to_float(images)
  codes, _, _ = VQModel(cfg).apply({"params": params}, images, method=VQModel.encode)
  return codes


@functools.partial(jax.jit, static_argnames=("cfg",))
def decode_fn(params, codes: jax.Array, cfg: VQConfig) -> jax.Array:
  """params, codes [B, h, w] int -> images [B, H, W, 3] fp32, unclipped."""
  return VQModel(cfg).apply(
    {"params": params}, codes.astype(jnp.int32), method=VQModel.decode_codes
  )


def init_params(cfg: VQConfig, rng: jax.Array):
  """Fresh parameters (the "params" collection) for an image_size x image_size input."""
  images = jnp.zeros((1, cfg.image_size, cfg.image_size, 3), jnp.float32)
  return VQModel(cfg).init(rng, images)["params"]


def abstract_params(cfg: VQConfig):
  """The params tree as ShapeDtypeStructs, without allocating (a small image suffices for the
  shapes)."""
  f = cfg.downsample
  images = jax.ShapeDtypeStruct((1, f, f, 3), jnp.float32)
  return jax.eval_shape(lambda x: VQModel(cfg).init(jax.random.key(0), x), images)["params"]


def param_shapes(vq_config: ml_collections.ConfigDict) -> dict[str, tuple[int, ...]]:
  """{path: shape} for a config, path components joined by "/" (e.g. "encoder/conv_in/kernel")."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params(VQConfig.from_config(vq_config)))[0]
  return {"/".join(str(p.key) for p in path): tuple(x.shape) for path, x in flat}


def count_params(cfg: VQConfig) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(cfg)))
