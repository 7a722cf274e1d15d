"""Sampling, a library: the jitted KV-cache sampler and what surrounds it.

The final NPP model is a plain next-token model (NPP.md 5), so sampling is LlamaGen's: condition on
the class embedding, decode the grid in raster order, classifier-free guidance through a second
batch half that holds the null class, then temperature, top-k and top-p as the release applies them.
A text model (model.condition="text") prefills its T left-padded caption positions instead, with
the caption's padding mask, and guides against the null caption under the same mask (NPP.md, "Text
to image").

Reproducibility: sample i of a run draws its randomness from fold_in(seed key, i) and step t from
fold_in(that, t), so a sample depends on its global index only, never on the batch size, the batch
position or the number of devices.

Placement (`Sampler`): on a mesh, the weights and KV caches are split by the logical-axis rules that
split training's weights (config.mesh), so a model that needs several chips to train samples on them
too; without rules the weights are whole on every device. Two programs, the prefill and one decode
step, can be compiled ahead of time from shapes alone; the sampling loop is built from the same two.
"""

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from npp_jax import rules
from npp_jax import sharding
from npp_jax.models import gpt

# -------------------------------------------------------------------------------------------------
# Logit processing (each step, on fp32 logits [B, V]).


def guide(cond, uncond, scale):
  """Classifier-free guidance as the release mixes it: uncond + s * (cond - uncond)."""
  return uncond + scale * (cond - uncond)


def filter_logits(logits, *, temperature, top_k: int = 0, top_p=1.0, use_top_p: bool | None = None):
  """Temperature, then top-k, then top-p (nucleus), as LlamaGen's sampler; removed entries: -inf.

  top_k (static) keeps every logit >= the k-th largest (0 = off). top_p keeps the smallest set of
  the most likely tokens whose probability mass reaches top_p (the most likely token always
  survives), computed on the top-k-filtered distribution. Ties at a threshold are all kept, so with
  exactly tied logits the kept set can be larger than the release's, whose choice among ties follows
  its sort order. `use_top_p` (static) skips the sort when top_p is known to be 1; None decides from
  a concrete top_p.
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
    # Mass of the tokens strictly more likely than each sorted token: a token is kept while that
    # mass is still below top_p, i.e. the release's "cumulative mass > p, shifted right by one"
    # rule.
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < top_p
    keep = keep.at[..., 0].set(True)
    n_keep = jnp.sum(keep, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, neg_inf, logits)
  return logits


# -------------------------------------------------------------------------------------------------
# Settings.


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How each token is drawn: the five `sample.*` knobs every sampling path shares (the sampling
  job, FID during training, notebooks). Every rule is checked on construction, so a library caller
  and the CLI (`from_config`) get the same one-line error."""

  cfg_scale: float = 1.0  # Classifier-free guidance; 1 turns it off.
  cfg_interval: int = -1  # -1 guides every token; n >= 0 guides tokens 0 .. n + 1 only (release).
  temperature: float = 1.0
  top_k: int = 0  # 0 = off; 1 = greedy.
  top_p: float = 1.0  # 1.0 = off.
  # Text models (model.condition="text"): the captions, as a prompts file read through the T5
  # folder `text_encoder`, or a folder of LlamaGen's caption features 0.npy .. N-1.npy; each
  # caption is sampled `images_per_caption` times. configs/t2i.py sets LlamaGen's text defaults
  # (cfg_scale 7.5, top_k 1000).
  prompts: str = ""
  text_encoder: str = ""
  caption_features: str = ""
  images_per_caption: int = 1

  def __post_init__(self):
    # The release ignores scales below 1; they are refused rather than silently dropped.
    rules.check("sample.cfg_scale", self.cfg_scale, _CFG_SCALE)
    rules.check("sample.cfg_interval", self.cfg_interval, _CFG_INTERVAL)
    rules.check("sample.temperature", self.temperature, rules.POSITIVE)
    rules.check("sample.top_k", self.top_k, rules.COUNT)
    rules.check("sample.top_p", self.top_p, _TOP_P)
    for field in ("prompts", "text_encoder", "caption_features"):
      rules.check(f"sample.{field}", getattr(self, field), _PATH)
    rules.check("sample.images_per_caption", self.images_per_caption, rules.POSITIVE_INT)
    if self.prompts and self.caption_features:
      raise ValueError(
        f"sample.prompts={self.prompts!r} and sample.caption_features="
        f"{self.caption_features!r}; expected one of them (prompts need sample.text_encoder)"
      )
    if bool(self.prompts) != bool(self.text_encoder):
      raise ValueError(
        f"sample.prompts={self.prompts!r} with sample.text_encoder={self.text_encoder!r}; "
        "expected both (a prompts file and the T5 folder that encodes it) or neither"
      )

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
  def text(self) -> bool:
    """Captions are given (a text model's run)."""
    return bool(self.prompts or self.caption_features)

  def check_model(self, model: gpt.GPTConfig) -> "SamplingSettings":
    """Captions for a text model, none for a class model."""
    if model.condition == "text" and not self.text:
      raise ValueError(
        "model.condition='text' but sample.prompts and sample.caption_features are empty; "
        "expected captions to sample from (a prompts file with sample.text_encoder, or a folder "
        "of caption features)"
      )
    if model.condition != "text" and self.text:
      field = "prompts" if self.prompts else "caption_features"
      raise ValueError(
        f"sample.{field}={getattr(self, field)!r} but model.condition={model.condition!r}; "
        "expected a text model (model.condition='text') for captions, or no captions"
      )
    return self

  @property
  def use_cfg(self) -> bool:
    return self.cfg_scale > 1.0

  def static(self) -> tuple[bool, int, bool]:
    """What changes the program (guidance on, top_k, top-p on); the rest are traced scalars, so a
    new temperature or scale reuses the compiled sampler."""
    return self.use_cfg, int(self.top_k), self.top_p < 1.0

  def knobs(self) -> dict:
    """The traced scalars of the program (see `static`)."""
    return {
      "scale": jnp.float32(self.cfg_scale),
      "interval": jnp.int32(self.cfg_interval),
      "temperature": jnp.float32(self.temperature),
      "top_p": jnp.float32(self.top_p),
    }


_FIELDS = (
  "cfg_scale",
  "cfg_interval",
  "temperature",
  "top_k",
  "top_p",
  "prompts",
  "text_encoder",
  "caption_features",
  "images_per_caption",
)
_PATH = ("a path (a string; '' = unset)", lambda v: isinstance(v, str))
_CFG_SCALE = ("a number >= 1 (1 turns guidance off)", lambda v: rules.is_num(v) and v >= 1)
_CFG_INTERVAL = (
  "-1 (guide every token) or an integer >= 0",
  lambda v: rules.is_int(v) and v >= -1,
)
_TOP_P = ("a number in (0, 1] (1 = off)", lambda v: rules.is_num(v) and 0 < v <= 1)


# -------------------------------------------------------------------------------------------------
# Layout: where the sampler's arrays live.
#
# Sharded (the logical-axis rules of config.mesh, as training uses them): the weights split over
# fsdp and tensor, the KV caches over the batch (data, fsdp) and their heads over tensor, the batch
# over data and fsdp. XLA then keeps the weights where they are and moves the (small) activations of
# each token instead. Replicated (no rules): the weights whole on every device, the batch over every
# device. On a mesh with fsdp = tensor = 1 (config.mesh's default) the two are the same layout.


def _auto_axes(mesh: Mesh) -> Mesh:
  """The same devices and axes with Auto axis types: the sampler states its shardings itself."""
  return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis over every device of the mesh (replicated layout, VQ decoding)."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def replicated_rules(mesh: Mesh) -> tuple:
  """Logical-axis rules of the replicated layout: the batch over every axis, nothing else split."""
  return (("batch", tuple(mesh.axis_names)),)


def _mesh_axes(target) -> tuple[str, ...]:
  return () if target is None else (target,) if isinstance(target, str) else tuple(target)


@dataclasses.dataclass(frozen=True)
class _Layout:
  """NamedShardings of everything the programs take and return."""

  params: Any  # Tree like the unscanned GPT parameters.
  batch: NamedSharding  # [B, ...] arrays: labels, keys, tokens, codes.
  cache: NamedSharding  # Each per-layer [B, Hkv, T, hd] key or value cache.
  replicated: NamedSharding  # The key, scalars.
  n_layer: int
  text: bool  # A text model: the state carries the caption mask.

  @property
  def state(self) -> dict:
    """Shardings of the decode state (see `_programs`)."""
    caches = tuple((self.cache, self.cache) for _ in range(self.n_layer))
    state = {"codes": self.batch, "token": self.batch, "keys": self.batch, "cache": caches}
    return {**state, "text_mask": self.batch} if self.text else state


@functools.lru_cache(maxsize=32)
def _layout(model: gpt.GPTConfig, mesh: Mesh, axis_rules: tuple) -> _Layout:
  """Shardings from the rules; a one-line ValueError where an axis is missing or a size does not
  split."""
  for name, target in axis_rules:
    missing = [a for a in _mesh_axes(target) if a not in mesh.axis_names]
    if missing:
      raise ValueError(
        f"mesh.rules maps {name!r} to mesh axis {missing[0]!r}, which the sampling mesh "
        f"(axes {mesh.axis_names}) does not have; expected rules over the mesh's axes"
      )
  boxed = gpt.abstract_params(model)
  params = sharding.logical_shardings(boxed, mesh, axis_rules)
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(boxed))[0]
  for (path, x), s in zip(flat, jax.tree.leaves(params)):
    name = "/".join(str(p.key) for p in path)
    _check_splits(f"parameter {name}", x.shape, s.spec, mesh)
  batch, heads, *rest = nn.logical_to_mesh_axes(gpt.CACHE_AXES, axis_rules)
  # The caches' heads follow the weights' "heads" rule where the KV heads divide over it; else each
  # device keeps all heads of its samples (grouped-query models with fewer KV heads than devices).
  if model.n_kv_head % _size(mesh, heads):
    heads = None
  return _Layout(
    params,
    NamedSharding(mesh, P(batch)),
    NamedSharding(mesh, P(batch, heads, *rest)),
    NamedSharding(mesh, P()),
    model.n_layer,
    model.condition == "text",
  )


def _size(mesh: Mesh, axes) -> int:
  return int(np.prod([mesh.shape[a] for a in _mesh_axes(axes)]))


def _check_splits(what: str, shape, spec: P, mesh: Mesh) -> None:
  for dim, (n, axes) in enumerate(zip(shape, spec)):
    if n % _size(mesh, axes):
      raise ValueError(
        f"{what} of shape {tuple(shape)} does not split over mesh axes {_mesh_axes(axes)} "
        f"({_size(mesh, axes)} devices) on dimension {dim}; expected a mesh whose fsdp and tensor "
        "sizes divide the model's sizes, or mesh.shape=(-1, 1, 1) (weights whole on every device)"
      )


# -------------------------------------------------------------------------------------------------
# The programs: prefill, one decode step, and the whole loop built from those two.


def _pick(logits, t, keys, knobs, *, use_cfg: bool, top_k: int, use_top_p: bool):
  """Next token [B] from the last position's logits of all sequences [B or 2B, V] at step t."""
  if use_cfg:
    pair = logits.reshape(-1, 2, logits.shape[-1])  # Rows 2b, 2b+1: sample b's cond, uncond.
    cond, uncond = pair[:, 0], pair[:, 1]
    # The release guides the prefill token and decode-loop iteration i (token i + 1) while
    # i <= cfg_interval, i.e. tokens 0 .. cfg_interval + 1; -1 guides all of them.
    interval = knobs["interval"]
    on = (interval < 0) | (t <= interval + 1)
    logits = jnp.where(on, guide(cond, uncond, knobs["scale"]), cond)
  if top_k == 1:  # Top-1 filtering leaves one token: its argmax, whatever the temperature.
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(
    logits,
    temperature=knobs["temperature"],
    top_k=top_k,
    top_p=knobs["top_p"],
    use_top_p=use_top_p,
  )
  step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, t)
  return jax.vmap(jax.random.categorical)(step_keys, logits).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class _Programs:
  """The jitted programs of one (model, mesh, rules, static settings).

  State between steps: {"codes" [B, n], "token" [B] (the last chosen), "keys" [B] (each sample's
  key), "cache" (per-layer (k, v), [B or 2B, Hkv, T + n - 1, hd]), and for text models "text_mask"
  [B or 2B, T]}. params: unscanned, compute dtype. cond: labels [B] (class models), or (caption
  features [B, T, caption_dim] left-padded, caption mask bool [B, T]) for text models.
  """

  prefill: Any  # (params, cond, rng, first_index, knobs) -> state with token 0 chosen.
  decode: Any  # (params, state, t, knobs) -> state with token t chosen; the state is donated.
  loop: Any  # (params, cond, rng, first_index, knobs) -> codes [B, rows, cols].
  layout: _Layout


@functools.lru_cache(maxsize=32)
def _programs(model: gpt.GPTConfig, mesh: Mesh, axis_rules: tuple, static: tuple) -> _Programs:
  use_cfg, top_k, use_top_p = static
  rows, cols = model.grid
  n = rows * cols
  decoder = gpt.Decoder(model)
  pick = functools.partial(_pick, use_cfg=use_cfg, top_k=top_k, use_top_p=use_top_p)
  layout = _layout(model, mesh, axis_rules)
  constrain = functools.partial(jax.lax.with_sharding_constraint, shardings=layout.state)
  text = model.condition == "text"
  last_cond = model.cls_token_num - 1  # The condition position that predicts token 0.

  def embed_condition(variables, cond):
    """-> (embeddings [B or 2B, T, D], text mask [B or 2B, T] or None). With guidance, rows 2b and
    2b + 1 are sample b with its condition and with the null one (interleaved so that each device
    holds both halves of its own samples)."""
    if not text:
      labels = cond
      if use_cfg:
        labels = jnp.stack([labels, jnp.full_like(labels, model.num_classes)], 1).reshape(-1)
      labels = jax.lax.with_sharding_constraint(labels, layout.batch)
      return decoder.apply(variables, labels, method=gpt.Decoder.embed_class), None
    caption, mask = cond
    mask = mask.astype(bool)
    # Padded caption rows are zero, as LlamaGen's sampler zeroes them; the null caption of guidance
    # stays whole but keeps the caption's mask (NPP.md, "Text to image").
    caption = caption * mask[..., None].astype(caption.dtype)
    null = jnp.zeros(mask.shape[:1], bool)
    if use_cfg:
      caption, mask = jnp.repeat(caption, 2, axis=0), jnp.repeat(mask, 2, axis=0)
      null = jnp.tile(jnp.array([False, True]), null.shape[0])
    caption, mask, null = jax.lax.with_sharding_constraint((caption, mask, null), layout.batch)
    x = decoder.apply(variables, caption, null, method=gpt.Decoder.embed_caption)
    return x, mask

  def prefill(params, cond, rng, first_index, knobs):
    variables = {"params": params}
    b = jax.tree.leaves(cond)[0].shape[0]
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, first_index + jnp.arange(b))
    x, text_mask = embed_condition(variables, cond)
    cache = jax.lax.with_sharding_constraint(
      gpt.init_cache(model, x.shape[0], gpt.cache_length(model)), layout.state["cache"]
    )
    # All condition positions at once; the last one predicts token 0.
    logits, cache = decoder.apply(variables, x, cache, 0, text_mask)
    token = pick(logits[:, -1], 0, keys, knobs)
    codes = jnp.zeros((b, n), jnp.int32).at[:, 0].set(token)
    state = {"codes": codes, "token": token, "keys": keys, "cache": cache}
    return constrain({**state, "text_mask": text_mask} if text else state)

  def decode(params, state, t, knobs):
    variables = {"params": params}
    token = jnp.repeat(state["token"], 2) if use_cfg else state["token"]
    x = decoder.apply(variables, token[:, None], method=gpt.Decoder.embed_tokens)
    text_mask = state.get("text_mask")
    logits, cache = decoder.apply(variables, x, state["cache"], last_cond + t, text_mask)
    token = pick(logits[:, -1], t, state["keys"], knobs)
    codes = jax.lax.dynamic_update_slice(state["codes"], token[:, None], (0, t))
    return constrain({**state, "codes": codes, "token": token, "cache": cache})

  def loop(params, cond, rng, first_index, knobs):
    # Every use casts the weights to the compute dtype anyway; doing it once here keeps the casts
    # (and their memory traffic) out of the token loop. Placed parameters are in that dtype already.
    params = jax.tree.map(lambda p: p.astype(model.dtype), params)
    state = prefill(params, cond, rng, first_index, knobs)
    state = jax.lax.fori_loop(1, n, lambda t, s: decode(params, s, t, knobs), state)
    return state["codes"].reshape(-1, rows, cols)

  rep, batch = layout.replicated, layout.batch
  return _Programs(
    prefill=jax.jit(
      prefill, in_shardings=(layout.params, batch, rep, rep, rep), out_shardings=layout.state
    ),
    decode=jax.jit(
      decode,
      in_shardings=(layout.params, layout.state, rep, rep),
      out_shardings=layout.state,
      donate_argnums=1,
    ),
    loop=jax.jit(loop, in_shardings=(layout.params, batch, rep, rep, rep), out_shardings=batch),
    layout=layout,
  )


@functools.lru_cache(maxsize=32)
def _placer(model: gpt.GPTConfig, mesh: Mesh, axis_rules: tuple):
  """Jitted: device parameters of any layout -> unscanned, compute dtype, the sampler's layout."""

  def place(params):
    return jax.tree.map(lambda x: x.astype(model.dtype), gpt.unstack_layers(params))

  return jax.jit(place, out_shardings=_layout(model, mesh, axis_rules).params)


# -------------------------------------------------------------------------------------------------
# The sampler.


@dataclasses.dataclass(frozen=True)
class Sampler:
  """Sampling of one model with one set of settings on one mesh; checked on construction.

  model: the GPT (any layout; sampling uses the unscanned one) whose `dtype` is the compute dtype.
  mesh: None is one local device. rules: the logical-axis rules that place the weights, the KV
  caches and the batch, as `sharding.rules(config.mesh)` returns them (training's placement); None
  keeps the weights whole on every device and splits the batch over all of them.

  The sampling job and FID during training use config.mesh and its rules: on the default mesh
  (-1, 1, 1) that is the replicated layout, and a config whose mesh splits the weights to train
  (fsdp or tensor > 1) samples with them split the same way: what trains on a slice samples on it.
  Replicated is faster wherever the weights fit on one device: split weights cost collectives at
  every token of every layer. A sampling run picks it with --config.mesh.shape=-1,1,1.
  """

  model: gpt.GPTConfig
  settings: SamplingSettings = SamplingSettings()
  mesh: Mesh | None = None
  rules: tuple | None = None

  def __post_init__(self):
    mesh = self.mesh
    if mesh is None:
      mesh = Mesh(np.array(jax.local_devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    mesh = _auto_axes(mesh)
    axis_rules = replicated_rules(mesh) if self.rules is None else tuple(self.rules)
    model = dataclasses.replace(self.model, scan_layers=False, remat="none")
    object.__setattr__(self, "mesh", mesh)
    object.__setattr__(self, "rules", axis_rules)
    object.__setattr__(self, "model", model)
    self.settings.check_vocab(model.vocab_size)
    _layout(model, mesh, axis_rules)  # Checks that every array splits over the mesh.

  @classmethod
  def from_config(
    cls, config: ml_collections.ConfigDict, mesh: Mesh, platform: str | None = None
  ) -> "Sampler":
    """The sampler a run of `config` uses on `mesh`: config.model in sample.dtype's compute dtype
    for `platform` (see `compute_dtype`), config.sample's settings, config.mesh's rules. With
    `platform="tpu"` and a TPU topology's mesh, `programs` gives what that slice would run."""
    model = dataclasses.replace(
      gpt.GPTConfig.from_config(config.model),
      dtype=compute_dtype(config.sample, config.model, platform),
    )
    settings = SamplingSettings.from_config(config)
    return cls(model, settings, mesh, sharding.rules(config.mesh))

  @property
  def _jitted(self) -> _Programs:
    return _programs(self.model, self.mesh, self.rules, self.settings.static())

  @property
  def param_shardings(self):
    return _layout(self.model, self.mesh, self.rules).params

  @property
  def batch_devices(self) -> int:
    """How many ways the batch is split: B must be a multiple of it."""
    return _size(self.mesh, _layout(self.model, self.mesh, self.rules).batch.spec[0])

  def check_batch(self, batch_size: int, what: str = "batch") -> None:
    """One-line ValueError unless `batch_size` samples split evenly over the batch devices."""
    n = self.batch_devices
    if batch_size % n:
      raise ValueError(
        f"{what} of {batch_size} samples over {n} devices (the batch axes of mesh "
        f"{dict(self.mesh.shape)}); expected a multiple of {n}"
      )

  def abstract_params(self, dtype=None):
    """The unscanned parameters as ShapeDtypeStructs (compute dtype unless `dtype`) with their
    shardings: a restore target, or the parameters of an ahead-of-time compile."""
    dtype = dtype or self.model.dtype
    shapes = nn.unbox(gpt.abstract_params(self.model))
    return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s), shapes, self.param_shardings
    )

  def place_params(self, params):
    """GPT parameters (either layout; host arrays, device arrays, or a sharded training state) ->
    unscanned, in the compute dtype, placed as the sampler wants them. Arrays already on the mesh's
    devices (a training state, on any number of processes) go through one jitted program straight
    into the sampler's shardings; others are cast before they are placed, so the devices never
    hold a second copy in the parameter dtype."""
    devices = set(self.mesh.devices.flat)
    leaves = jax.tree.leaves(params)
    if all(isinstance(x, jax.Array) and x.sharding.device_set == devices for x in leaves):
      return _placer(self.model, self.mesh, self.rules)(params)
    dtype = self.model.dtype

    def one(x, s):
      return sharding.put(x.astype(dtype) if isinstance(x, jax.Array) else np.asarray(x, dtype), s)

    return jax.tree.map(one, gpt.unstack_layers(params), self.param_shardings)

  def sample(self, params, cond, rng, *, first_index: int = 0) -> jax.Array:
    """Codes int32 [B, rows, cols], split over the batch devices. cond (host values, or placed):
    labels [B] for a class model; for a text model (caption features [B, T, caption_dim]
    left-padded, caption mask bool [B, T]) as `left_pad` makes them. params: as `place_params`
    returns them. Nothing is checked here (`sample_codes` checks); the sampling job checks once,
    then calls this for every batch."""
    p = self._jitted
    if self.model.condition == "text":
      cond = tuple(cond)
      dtypes = (np.float32, np.bool_)
    else:
      cond, dtypes = (cond,), (np.int32,)
    cond = tuple(
      sharding.put(x if isinstance(x, jax.Array) else np.asarray(x, d), p.layout.batch)
      for x, d in zip(cond, dtypes)
    )
    cond = cond if self.model.condition == "text" else cond[0]
    rng = sharding.put(rng, p.layout.replicated)
    return p.loop(params, cond, rng, jnp.int32(first_index), self.settings.knobs())

  def abstract_cond(self, batch_size: int):
    """The condition of `batch_size` samples as ShapeDtypeStructs with their shardings."""
    model, batch = self.model, self._jitted.layout.batch
    if model.condition == "text":
      t = model.cls_token_num
      return (
        jax.ShapeDtypeStruct((batch_size, t, model.caption_dim), jnp.float32, sharding=batch),
        jax.ShapeDtypeStruct((batch_size, t), jnp.bool_, sharding=batch),
      )
    return jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=batch)

  def programs(self, batch_size: int) -> dict:
    """{"sample_prefill": (jitted, args), "sample_decode": (jitted, args)} for `batch_size`
    samples, args being ShapeDtypeStructs with their shardings: `fn.lower(*args).compile()` compiles
    what the sampling loop runs (its prefill, its step) without any array, e.g. on a TPU topology's
    mesh. The decode step donates its state, so the cache is updated in place."""
    self.check_batch(batch_size)
    p = self._jitted
    rep = p.layout.replicated

    def scalar(x):
      return jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x), sharding=rep)

    rng = jax.eval_shape(lambda: jax.random.key(0))
    knobs = jax.tree.map(scalar, self.settings.knobs())
    prefill_args = (
      self.abstract_params(),
      self.abstract_cond(batch_size),
      jax.ShapeDtypeStruct(rng.shape, rng.dtype, sharding=rep),
      scalar(jnp.int32(0)),
      knobs,
    )
    state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      jax.eval_shape(p.prefill, *prefill_args),
      p.layout.state,
    )
    decode_args = (prefill_args[0], state, scalar(jnp.int32(1)), knobs)
    return {"sample_prefill": (p.prefill, prefill_args), "sample_decode": (p.decode, decode_args)}


def sample_codes(
  params,
  labels,
  rng,
  *,
  model: gpt.GPTConfig,
  settings: SamplingSettings = SamplingSettings(),
  first_index: int = 0,
  mesh: Mesh | None = None,
  rules=None,
) -> jax.Array:
  """Codes int32 [B, rows, cols] for class labels [B] (class models) or captions (text models:
  (features [B, T, caption_dim] left-padded, mask bool [B, T]), see `left_pad`), decoded in one
  jitted loop over the grid.

  params: GPT parameters (either layout), cast to model.dtype, the compute dtype. rng: one key;
  sample b uses fold_in(rng, first_index + b), so the global index of a sample fixes its randomness.
  mesh and rules: where the weights, caches and batch live (`Sampler`); B must split over the batch
  devices.
  """
  sampler = Sampler(model, settings, mesh, rules)
  if model.condition == "text":
    features, mask = labels
    t, c = model.cls_token_num, model.caption_dim
    if features.ndim != 3 or features.shape[1:] != (t, c) or mask.shape != features.shape[:2]:
      raise ValueError(
        f"caption features {tuple(features.shape)} with mask {tuple(mask.shape)}; expected "
        f"[B, model.cls_token_num={t}, model.caption_dim={c}] and [B, {t}]"
      )
    sampler.check_batch(features.shape[0])
    return sampler.sample(sampler.place_params(params), labels, rng, first_index=first_index)
  if not isinstance(labels, jax.Array):
    labels = np.asarray(labels)
  if labels.ndim != 1 or labels.shape[0] == 0:
    raise ValueError(f"labels of shape {labels.shape}; expected a non-empty vector [B]")
  if not isinstance(labels, jax.Array) or labels.is_fully_addressable:  # Values readable here.
    host_labels = np.asarray(labels)
    bad = host_labels[(host_labels < 0) | (host_labels >= model.num_classes)]
    if bad.size:
      raise ValueError(
        f"class id {int(bad[0])} out of range; expected 0 <= label < {model.num_classes}"
      )
  sampler.check_batch(labels.shape[0])
  return sampler.sample(sampler.place_params(params), labels, rng, first_index=first_index)


# -------------------------------------------------------------------------------------------------
# Around the sampler: labels, captions, compute dtype, codes -> images.


def left_pad(captions, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Captions, each [L_i, caption_dim] with L_i <= length (its tokens' features, EOS included) ->
  (features float32 [N, length, caption_dim], mask bool [N, length]) with each caption's rows at
  the end and zeros before them: LlamaGen's left padding at sampling time (NPP.md, "Text to
  image")."""
  dim = captions[0].shape[-1]
  features = np.zeros((len(captions), length, dim), np.float32)
  mask = np.zeros((len(captions), length), bool)
  for i, c in enumerate(captions):
    if c.ndim != 2 or not 1 <= c.shape[0] <= length or c.shape[1] != dim:
      raise ValueError(
        f"caption {i} of shape {c.shape}; expected [L, {dim}] with 1 <= L <= {length}"
      )
    features[i, length - len(c) :], mask[i, length - len(c) :] = c, True
  return features, mask


def sample_labels(sample_config, num_classes: int, indices) -> np.ndarray:
  """Class of each global sample index: the given classes (or all classes) cycled, so any prefix of
  the run, and every batch, is as balanced as it can be."""
  classes = np.asarray(tuple(sample_config.classes) or range(num_classes), np.int32)
  return classes[np.asarray(indices) % len(classes)]


def compute_dtype(sample_config, model_config, platform: str | None = None):
  """sample.dtype on `platform` (default: this machine's; "tpu" for a TPU program built here)."""
  if sample_config.dtype == "auto":
    # GPT-B decode in bf16 measured 1.4x slower than fp32 on a 2-core CPU (benchmarks/sample.py).
    platform = platform or jax.devices()[0].platform
    return jnp.float32 if platform == "cpu" else gpt.DTYPES[model_config.dtype]
  if sample_config.dtype not in gpt.DTYPES:
    raise ValueError(
      f"sample.dtype={sample_config.dtype!r}; expected 'auto' or one of {sorted(gpt.DTYPES)}"
    )
  return gpt.DTYPES[sample_config.dtype]


# Images per device per VQ decode call: the decoder's activations at 256 px take ~0.2 GB per image,
# so a whole sampling batch at once could exhaust a CPU host or a small accelerator.
VQ_CHUNK_PER_DEVICE = 4


def decode_images(vq_params, codes: np.ndarray, vq_cfg, mesh) -> np.ndarray:
  """codes [n, h, w] -> uint8 [n, H, W, 3], as the release writes samples (the ADM evaluator's)."""
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
