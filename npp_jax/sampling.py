"""Class-conditional sampling, a library: the jitted KV-cache sampler and what surrounds it.

The final NPP model is a plain next-token model (NPP.md 5), so sampling is LlamaGen's: condition on the
class embedding, decode the grid in raster order, classifier-free guidance through a second batch half
that holds the null class, then temperature, top-k and top-p as the release applies them.

Reproducibility: sample i of a run draws its randomness from fold_in(seed key, i) and step t from
fold_in(that, t), so a sample depends on its global index only, never on the batch size, the batch
position or the number of devices.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from npp_jax import rules
from npp_jax import sharding
from npp_jax.models import gpt

# ---------------------------------------------------------------------------------------------------------
# Logit processing (each step, on fp32 logits [B, V]).


def guide(cond, uncond, scale):
  """Classifier-free guidance as the release mixes it: uncond + s * (cond - uncond)."""
  return uncond + scale * (cond - uncond)


def filter_logits(logits, *, temperature, top_k: int = 0, top_p=1.0, use_top_p: bool | None = None):
  """Temperature, then top-k, then top-p (nucleus), as LlamaGen's sampler; removed entries become -inf.

  top_k (static) keeps every logit >= the k-th largest (0 = off). top_p keeps the smallest set of the most
  likely tokens whose probability mass reaches top_p (the most likely token always survives), computed on
  the top-k-filtered distribution. Ties at a threshold are all kept, so with exactly tied logits the kept
  set can be larger than the release's, whose choice among ties follows its sort order.
  `use_top_p` (static) skips the sort when top_p is known to be 1; None decides from a concrete top_p.
  """
  logits = logits / temperature
  neg_inf = jnp.asarray(-jnp.inf, logits.dtype)
  if top_k > 0:
    kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if use_top_p is None:
    use_top_p = float(top_p) < 1.0
  if use_top_p:
    sorted_logits = -jnp.sort(-logits, axis=-1)  # Descending.
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Mass of the tokens strictly more likely than each sorted token: a token is kept while that mass is
    # still below top_p, i.e. the release's "cumulative mass > p, shifted right by one" rule.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    keep = keep.at[..., 0].set(True)
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return logits


# ---------------------------------------------------------------------------------------------------------
# The sampler.


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How each token is drawn: the five `sample.*` knobs every sampling path shares (the sampling job, FID
  during training, notebooks). Every rule is checked on construction, so a library caller and the CLI
  (`from_config`) get the same one-line error."""

  cfg_scale: float = 1.0  # Classifier-free guidance; 1 turns it off.
  cfg_interval: int = (
    -1
  )  # -1 guides every token; n >= 0 guides tokens 0 .. n + 1 only, as the release.
  temperature: float = 1.0
  top_k: int = 0  # 0 = off; 1 = greedy.
  top_p: float = 1.0  # 1.0 = off.

  def __post_init__(self):
    # The release ignores scales below 1; they are refused rather than silently dropped.
    rules.check("sample.cfg_scale", self.cfg_scale, _CFG_SCALE)
    rules.check("sample.cfg_interval", self.cfg_interval, _CFG_INTERVAL)
    rules.check("sample.temperature", self.temperature, rules.POSITIVE)
    rules.check("sample.top_k", self.top_k, rules.COUNT)
    rules.check("sample.top_p", self.top_p, _TOP_P)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "SamplingSettings":
    return cls(**{f: rules.get(config, f"sample.{f}") for f in _FIELDS})

  def check_vocab(self, vocab_size: int) -> "SamplingSettings":
    """top_k cannot keep more tokens than the model has."""
    if self.top_k > vocab_size:
      raise ValueError(
        f"sample.top_k={self.top_k}; expected an integer in [0, model.vocab_size={vocab_size}] "
        "(0 = off, 1 = greedy)"
      )
    return self

  @property
  def use_cfg(self) -> bool:
    return self.cfg_scale > 1.0


_FIELDS = ("cfg_scale", "cfg_interval", "temperature", "top_k", "top_p")
_CFG_SCALE = (
  "a number >= 1 (1 turns guidance off)",
  lambda v: rules.is_num(v) and v >= 1,
)
_CFG_INTERVAL = (
  "-1 (guide every token) or an integer >= 0",
  lambda v: rules.is_int(v) and v >= -1,
)
_TOP_P = ("a number in (0, 1] (1 = off)", lambda v: rules.is_num(v) and 0 < v <= 1)


def _check_sampling_args(cfg: gpt.GPTConfig, cfg_scale, cfg_interval, temperature, top_k, top_p):
  SamplingSettings(cfg_scale, cfg_interval, temperature, top_k, top_p).check_vocab(cfg.vocab_size)


def _auto_axes(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """The same devices and axes with Auto axis types: the sampler states its shardings itself."""
  return jax.sharding.Mesh(
    mesh.devices, mesh.axis_names, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
  )


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sampling keeps parameters whole on every device and splits the batch over all of them."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def _pick(
  logits,
  t,
  keys,
  scale,
  interval,
  temperature,
  top_p,
  *,
  use_cfg: bool,
  top_k: int,
  use_top_p: bool,
):
  """Next token [B] from the last position's logits of all sequences [B or 2B, V] at step t."""
  if use_cfg:
    pair = logits.reshape(-1, 2, logits.shape[-1])  # Rows 2b, 2b+1: sample b's cond, uncond.
    cond, uncond = pair[:, 0], pair[:, 1]
    # The release guides the prefill token and decode-loop iteration i (token i + 1) while
    # i <= cfg_interval, i.e. tokens 0 .. cfg_interval + 1; -1 guides all of them.
    on = (interval < 0) | (t <= interval + 1)
    logits = jnp.where(on, guide(cond, uncond, scale), cond)
  if top_k == 1:  # Top-1 filtering leaves one token: its argmax, whatever the temperature.
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(
    logits, temperature=temperature, top_k=top_k, top_p=top_p, use_top_p=use_top_p
  )
  step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)
  return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def _compiled_sampler(cfg: gpt.GPTConfig, mesh, use_cfg: bool, top_k: int, use_top_p: bool):
  """One jitted sampler per (model, mesh, static sampling options); jit caches shapes beneath it."""
  rows, cols = cfg.grid
  n = rows * cols
  decoder = gpt.Decoder(cfg)
  pick = functools.partial(_pick, use_cfg=use_cfg, top_k=top_k, use_top_p=use_top_p)

  def constrain(x):
    if mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))

  def run(params, labels, rng, first_index, scale, interval, temperature, top_p):
    # Every use casts the weights to the compute dtype anyway; doing it once here keeps the casts (and
    # their memory traffic) out of the token loop.
    variables = {"params": jax.tree.map(lambda p: p.astype(cfg.dtype), params)}
    b = labels.shape[0]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, first_index + jnp.arange(b))
    if use_cfg:  # Interleaved so that each device holds both halves of its own samples.
      seq_labels = jnp.stack([labels, jnp.full_like(labels, cfg.num_classes)], axis=1).reshape(-1)
    else:
      seq_labels = labels
    seq_labels = constrain(seq_labels)
    cache = jax.tree.map(constrain, gpt.init_cache(cfg, seq_labels.shape[0], n))
    sample_args = (keys, scale, interval, temperature, top_p)

    # Prefill: the class embedding at position 0 predicts token 0.
    x = decoder.apply(variables, seq_labels, method=gpt.Decoder.embed_class)
    logits, cache = decoder.apply(variables, x, cache, 0)
    token = pick(logits[:, -1], 0, *sample_args)
    codes = jnp.zeros((b, n), jnp.int32).at[:, 0].set(token)

    def body(t, carry):
      codes, token, cache = carry
      seq_tokens = jnp.repeat(token, 2) if use_cfg else token
      x = decoder.apply(variables, seq_tokens[:, None], method=gpt.Decoder.embed_tokens)
      logits, cache = decoder.apply(variables, x, cache, t)
      token = pick(logits[:, -1], t, *sample_args)
      codes = jax.lax.dynamic_update_slice(codes, token[:, None], (0, t))
      return codes, token, cache

    codes, _, _ = jax.lax.fori_loop(1, n, body, (codes, token, cache))
    return codes.reshape(b, rows, cols)

  if mesh is None:
    return jax.jit(run)
  rep, batch = sharding.replicated(mesh), batch_sharding(mesh)
  return jax.jit(run, in_shardings=(rep, batch, rep, rep, rep, rep, rep, rep), out_shardings=batch)


def sample_codes(
  params,
  labels,
  rng,
  *,
  cfg: gpt.GPTConfig,
  cfg_scale: float = 1.0,
  cfg_interval: int = -1,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  first_index: int = 0,
  mesh: jax.sharding.Mesh | None = None,
) -> jax.Array:
  """Codes int32 [B, rows, cols] for class labels [B], decoded in one jitted loop over the grid.

  params: GPT parameters (either layout), cast to cfg.dtype, the compute dtype. rng: one key; sample b
  uses fold_in(rng, first_index + b), so the global index of a sample fixes its randomness. With a mesh,
  the batch is split over all of its devices (B must divide evenly) and params are replicated.
  """
  _check_sampling_args(cfg, cfg_scale, cfg_interval, temperature, top_k, top_p)
  if not isinstance(labels, jax.Array):
    labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] == 0:
    raise ValueError(f"labels of shape {labels.shape}; expected a non-empty vector [B]")
  if not isinstance(labels, jax.Array) or labels.is_fully_addressable:  # Values readable here.
    host_labels = np.asarray(labels)
    bad = host_labels[(host_labels < 0) | (host_labels >= cfg.num_classes)]
    if bad.size:
      raise ValueError(
        f"class id {int(bad[0])} out of range; expected 0 <= label < {cfg.num_classes}"
      )
  if mesh is not None and labels.shape[0] % mesh.size:
    raise ValueError(
      f"batch of {labels.shape[0]} samples over {mesh.size} devices; expected a multiple "
      f"of {mesh.size}"
    )
  params = gpt.unstack_layers(params)
  labels = jnp.asarray(labels, jnp.int32)
  if mesh is not None:
    mesh = _auto_axes(mesh)
    params, rng = sharding.put((params, rng), sharding.replicated(mesh))
    labels = sharding.put(labels, batch_sharding(mesh))
  return _sample_placed(
    params,
    labels,
    rng,
    cfg=cfg,
    cfg_scale=cfg_scale,
    cfg_interval=cfg_interval,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    first_index=first_index,
    mesh=mesh,
  )


def _sample_placed(
  params, labels, rng, *, cfg, cfg_scale, cfg_interval, temperature, top_k, top_p, first_index, mesh
):
  """sample_codes without its checks and placement: params unscanned (replicated over `mesh`, an Auto
  mesh, when given), labels int32 (batch-sharded); the job checks and places once, then calls this."""
  fn = _compiled_sampler(cfg, mesh, cfg_scale > 1.0, int(top_k), top_p < 1.0)
  return fn(
    params,
    labels,
    rng,
    jnp.int32(first_index),
    jnp.float32(cfg_scale),
    jnp.int32(cfg_interval),
    jnp.float32(temperature),
    jnp.float32(top_p),
  )


# ---------------------------------------------------------------------------------------------------------
# Around the sampler: labels, compute dtype, codes -> images.


def sample_labels(sample_config, num_classes: int, indices) -> np.ndarray:
  """Class of each global sample index: the given classes (or all classes) cycled, so any prefix of the
  run, and every batch, is as balanced as it can be."""
  classes = np.asarray(tuple(sample_config.classes) or range(num_classes), np.int32)
  return classes[np.asarray(indices) % len(classes)]


def compute_dtype(sample_config, model_config):
  if sample_config.dtype == "auto":
    # GPT-B decode in bf16 measured 1.4x slower than fp32 on a 2-core CPU (benchmarks/sample.py).
    return jnp.float32 if jax.devices()[0].platform == "cpu" else gpt.DTYPES[model_config.dtype]
  if sample_config.dtype not in gpt.DTYPES:
    raise ValueError(
      f"sample.dtype={sample_config.dtype!r}; expected 'auto' or one of {sorted(gpt.DTYPES)}"
    )
  return gpt.DTYPES[sample_config.dtype]


# Images per device per VQ decode call: the decoder's activations at 256 px take ~0.2 GB per image, so a
# whole sampling batch at once could exhaust a CPU host or a small accelerator.
VQ_CHUNK_PER_DEVICE = 4


def decode_images(vq_params, codes: np.ndarray, vq_cfg, mesh) -> np.ndarray:
  """codes [n, h, w] -> uint8 [n, H, W, 3] as the release writes samples (the ADM evaluator's format)."""
  from npp_jax.models import vq

  chunk = VQ_CHUNK_PER_DEVICE * mesh.size
  out = []
  for start in range(0, len(codes), chunk):
    piece = codes[start : start + chunk]
    padded = np.zeros((chunk, *codes.shape[1:]), np.int32)  # One shape: one compile.
    padded[: len(piece)] = piece
    images = vq.decode_fn(vq_params, sharding.put(padded, batch_sharding(mesh)), vq_cfg)
    out.append(sharding.gather(_to_uint8(images))[: len(piece)])
  return np.concatenate(out)


@jax.jit
def _to_uint8(images):
  # Truncating cast after clip(127.5 x + 128), as the release converts its samples.
  return jnp.clip(127.5 * images + 128.0, 0, 255).astype(jnp.uint8)
