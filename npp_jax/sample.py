"""Class-conditional sampling: the jitted KV-cache sampler and the sampling job.

The final NPP model is a plain next-token model (NPP.md 5), so sampling is LlamaGen's: condition on the
class embedding, decode the grid in raster order, classifier-free guidance through a second batch half
that holds the null class, then temperature, top-k and top-p as the release applies them.

Reproducibility: sample i of a run draws its randomness from fold_in(seed key, i) and step t from
fold_in(that, t), so a sample depends on its global index only, never on the batch size, the batch
position or the number of devices.
"""
import dataclasses
import functools
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from npp_jax import checkpoints
from npp_jax import files
from npp_jax import sharding
from npp_jax import validate
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


def _check_sampling_args(cfg: gpt.GPTConfig, cfg_scale, cfg_interval, temperature, top_k, top_p):
  if not cfg_scale >= 1.0:
    raise ValueError(f"cfg_scale={cfg_scale}; expected >= 1 (1 turns guidance off; the release ignores "
                     "scales below 1, so they are refused rather than silently dropped)")
  if int(cfg_interval) != cfg_interval or cfg_interval < -1:
    raise ValueError(f"cfg_interval={cfg_interval}; expected -1 (guide every token) or an integer >= 0")
  if not temperature > 0:
    raise ValueError(f"temperature={temperature}; expected > 0")
  if int(top_k) != top_k or not 0 <= top_k <= cfg.vocab_size:
    raise ValueError(f"top_k={top_k}; expected an integer in [0, {cfg.vocab_size}] (0 = off, 1 = greedy)")
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f"top_p={top_p}; expected a value in (0, 1] (1 = off)")


def _auto_axes(mesh: jax.sharding.Mesh) -> jax.sharding.Mesh:
  """The same devices and axes with Auto axis types: the sampler states its shardings itself."""
  return jax.sharding.Mesh(mesh.devices, mesh.axis_names,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sampling keeps parameters whole on every device and splits the batch over all of them."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def _pick(logits, t, keys, scale, interval, temperature, top_p, *, use_cfg: bool, top_k: int,
          use_top_p: bool):
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
  logits = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, use_top_p=use_top_p)
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


def sample_codes(params, labels, rng, *, cfg: gpt.GPTConfig, cfg_scale: float = 1.0,
                 cfg_interval: int = -1, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 first_index: int = 0, mesh: jax.sharding.Mesh | None = None) -> jax.Array:
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
      raise ValueError(f"class id {int(bad[0])} out of range; expected 0 <= label < {cfg.num_classes}")
  if mesh is not None and labels.shape[0] % mesh.size:
    raise ValueError(f"batch of {labels.shape[0]} samples over {mesh.size} devices; expected a multiple "
                     f"of {mesh.size}")
  params = gpt.unstack_layers(params)
  labels = jnp.asarray(labels, jnp.int32)
  if mesh is not None:
    mesh = _auto_axes(mesh)
    params, rng = sharding.put((params, rng), sharding.replicated(mesh))
    labels = sharding.put(labels, batch_sharding(mesh))
  return _sample_placed(params, labels, rng, cfg=cfg, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                        temperature=temperature, top_k=top_k, top_p=top_p, first_index=first_index,
                        mesh=mesh)


def _sample_placed(params, labels, rng, *, cfg, cfg_scale, cfg_interval, temperature, top_k, top_p,
                   first_index, mesh):
  """sample_codes without its checks and placement: params unscanned (replicated over `mesh`, an Auto
  mesh, when given), labels int32 (batch-sharded); the job checks and places once, then calls this."""
  fn = _compiled_sampler(cfg, mesh, cfg_scale > 1.0, int(top_k), top_p < 1.0)
  return fn(params, labels, rng, jnp.int32(first_index), jnp.float32(cfg_scale), jnp.int32(cfg_interval),
            jnp.float32(temperature), jnp.float32(top_p))


# ---------------------------------------------------------------------------------------------------------
# The sampling job: python -m npp_jax.main --mode=sample --config=... --workdir=DIR


def sample_labels(sample_config, num_classes: int, indices) -> np.ndarray:
  """Class of each global sample index: the given classes (or all classes) cycled, so any prefix of the
  run, and every batch, is as balanced as it can be."""
  classes = np.asarray(tuple(sample_config.classes) or range(num_classes), np.int32)
  return classes[np.asarray(indices) % len(classes)]


def _compute_dtype(sample_config, model_config):
  if sample_config.dtype == "auto":
    # GPT-B decode in bf16 measured 1.4x slower than fp32 on a 2-core CPU (benchmarks/sample.py).
    return jnp.float32 if jax.devices()[0].platform == "cpu" else gpt.DTYPES[model_config.dtype]
  if sample_config.dtype not in gpt.DTYPES:
    raise ValueError(f"sample.dtype={sample_config.dtype!r}; expected 'auto' or one of {sorted(gpt.DTYPES)}")
  return gpt.DTYPES[sample_config.dtype]


def check_params(params, model_config, what: str) -> None:
  """One-line error when a parameter tree does not have the shapes of config.model (naming the release
  size it looks like, if any)."""
  got = checkpoints.param_shapes_of(gpt.unstack_layers(params))
  n_layer = sum(1 for k in got if k.startswith("layers_") and k.endswith("attention/wo/kernel"))
  dim = got.get("tok_embeddings/embedding", (0, 0))[-1]
  names = [name for name, (l, _, d) in gpt.MODEL_SIZES.items() if (l, d) == (n_layer, dim)]
  size = f" (it looks like {names[0]})" if names else ""
  try:
    checkpoints.check_param_shapes(gpt.unstack_layers(params), gpt.param_shapes(model_config),
                                   f"{what} does not fit model.name={model_config.name!r}{size}")
  except ValueError as e:
    raise ValueError(f"{e}; expected a checkpoint of the configured model (set --config.model.name)"
                     ) from None


def _absolute(path: str) -> str:
  # A path with a scheme (gs://) is absolute already and must stay as it is.
  return "" if not path else path if "://" in path else str(epath.Path(path).absolute())


def _settings(config) -> dict:
  """What fixes the content of sample i: a resumed run must agree on all of it."""
  s = config.sample
  return {
      "checkpoint": _absolute(s.checkpoint), "use_ema": bool(s.use_ema),
      "vq_checkpoint": _absolute(s.vq_checkpoint),
      "classes": [int(c) for c in s.classes], "cfg_scale": float(s.cfg_scale),
      "cfg_interval": int(s.cfg_interval), "temperature": float(s.temperature), "top_k": int(s.top_k),
      "top_p": float(s.top_p), "seed": int(s.seed), "dtype": str(s.dtype),
      "model": {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.model.items()},
  }


def _merge(path: epath.Path, shard_paths: list[epath.Path], n: int) -> None:
  """One .npz of all shards, streamed: 50k images (10 GB) never sit in memory at once."""
  with shard_paths[0].open("rb") as f, np.load(f) as z:
    keys = {k: (z[k].shape[1:], z[k].dtype) for k in z.files}

  def write(f):
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
      for key, (shape, dtype) in keys.items():
        with zf.open(f"{key}.npy", "w", force_zip64=True) as out:
          header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                    "shape": (n, *shape)}
          np.lib.format.write_array_header_1_0(out, header)
          for shard in shard_paths:
            with shard.open("rb") as f_in, np.load(f_in) as z:
              out.write(np.ascontiguousarray(z[key], dtype=dtype).tobytes())

  files.atomic_write(str(path), write)


def _write_grid(path: epath.Path, images_of, labels: np.ndarray, sample_config, num_classes: int) -> None:
  """PNG, one class per row: row r shows the first images of the r-th class sampled (sample.classes, or
  all classes in order), at most grid_rows rows of grid_cols images."""
  from PIL import Image

  rows, cols = sample_config.grid_rows, sample_config.grid_cols
  classes = list(sample_config.classes) or list(range(num_classes))
  picks = [np.flatnonzero(labels == c)[:cols] for c in classes[:rows]]
  picks = [p for p in picks if len(p)]
  cells = images_of(np.concatenate(picks))
  h, w = cells.shape[1:3]
  grid = np.zeros((len(picks) * h, cols * w, 3), np.uint8)
  i = 0
  for r, row in enumerate(picks):
    for c in range(len(row)):
      grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = cells[i]
      i += 1
  files.atomic_write(str(path), lambda f: Image.fromarray(grid).save(f, format="PNG"))


@dataclasses.dataclass(frozen=True)
class _Job:
  """A sampling job checked against its config, before anything is loaded, compiled or written."""
  cfg: gpt.GPTConfig  # Unscanned, in the sampling compute dtype.
  vq_cfg: Any  # vq.VQConfig, or None: codes only.
  mesh: jax.sharding.Mesh
  out_dir: epath.Path
  settings: dict
  num_images: int
  batch_size: int

  @property
  def spans(self) -> list[tuple[int, int]]:
    """[start, end) of the samples in each shard: one shard per global batch."""
    n, bs = self.num_images, self.batch_size
    return [(a, min(a + bs, n)) for a in range(0, n, bs)]

  def shard_path(self, span) -> epath.Path:
    width = len(str(self.num_images))
    return self.out_dir / f"shard_{span[0]:0{width}d}-{span[1]:0{width}d}.npz"


def sample_and_save(config: ml_collections.ConfigDict, workdir: str, *, params=None) -> str:
  """Samples config.sample.num_images images (or codes) into WORKDIR/samples; returns the merged file.

  One shard file per global batch, written atomically, so a killed run resumes where it stopped. Every
  setting is checked before anything compiles or is written. `params` (GPT parameters) replaces loading
  sample.checkpoint (tests, notebooks).
  """
  job = _check_job(config, workdir, params is not None)
  files.check_same_settings(str(job.out_dir / "meta.json"), job.settings, str(job.out_dir), "samples",
                            "expected the same settings or another --workdir")
  s = config.sample
  if params is None:
    params = checkpoints.load_params(s.checkpoint, ema=s.use_ema)
  check_params(params, config.model, f"checkpoint {s.checkpoint or '(given params)'}")
  vq_params = None
  if job.vq_cfg is not None:
    vq_params = checkpoints.load_vq_params(s.vq_checkpoint, config.vq)
  else:
    logging.info("No sample.vq_checkpoint: writing codes and labels only, no images.")
  return str(_run_job(job, s, params, vq_params))


def _check_job(config, workdir, have_params: bool) -> _Job:
  """The whole job's settings, checked; one-line ValueErrors, nothing loaded or written."""
  s = config.sample
  cfg = dataclasses.replace(gpt.GPTConfig.from_config(config.model), scan_layers=False,
                            dtype=_compute_dtype(s, config.model))
  _check_sampling_args(cfg, s.cfg_scale, s.cfg_interval, s.temperature, s.top_k, s.top_p)
  n, bs = validate.positive_int(s.num_images, "sample.num_images"), validate.positive_int(
      s.batch_size, "sample.batch_size")
  if s.grid_rows < 1 or s.grid_cols < 1:
    raise ValueError(f"sample.grid_rows={s.grid_rows}, sample.grid_cols={s.grid_cols}; expected >= 1")
  bad = [c for c in s.classes if int(c) != c or not 0 <= c < cfg.num_classes]
  if bad:
    raise ValueError(f"sample.classes holds class id {bad[0]} out of range; expected ids in "
                     f"[0, {cfg.num_classes})")
  mesh = sharding.make_mesh(config.mesh)
  if bs % mesh.size:
    raise ValueError(f"sample.batch_size={bs} over {mesh.size} devices; expected a multiple of "
                     f"{mesh.size} (every device decodes the same number of samples)")
  if not have_params and not s.checkpoint:
    raise ValueError("sample.checkpoint is empty; expected a training workdir or a converted checkpoint")
  if not have_params and not epath.Path(s.checkpoint).exists():
    raise ValueError(f"sample.checkpoint={s.checkpoint!r} does not exist; expected a training workdir, its "
                     "checkpoints/ folder, or a converted checkpoint")
  vq_cfg = _check_vq(config, cfg) if s.vq_checkpoint else None
  return _Job(cfg, vq_cfg, mesh, epath.Path(workdir) / "samples", _settings(config), n, bs)


def _check_vq(config, cfg: gpt.GPTConfig):
  """The VQ that turns codes into images must fit the GPT's codebook and grid."""
  from npp_jax.models import vq

  s = config.sample
  if "vq" not in config:
    raise ValueError("sample.vq_checkpoint is set but the config has no vq section; expected config.vq "
                     "(config_lib.vq_config()) describing the tokenizer")
  if not epath.Path(s.vq_checkpoint).is_dir():
    raise ValueError(f"sample.vq_checkpoint={s.vq_checkpoint!r} is not a directory; expected a VQ "
                     "checkpoint converted with npp_jax.convert --kind=vq, or '' for codes only")
  vq_cfg = vq.VQConfig.from_config(config.vq)
  if vq_cfg.codebook_size != cfg.vocab_size:
    raise ValueError(f"vq.codebook_size={vq_cfg.codebook_size} but model.vocab_size={cfg.vocab_size}; "
                     "expected the tokenizer the model was trained on")
  if vq_cfg.grid != cfg.grid:
    raise ValueError(f"vq.image_size={vq_cfg.image_size} gives a {vq_cfg.grid} code grid but "
                     f"model.grid={cfg.grid}; expected the same grid")
  return vq_cfg


def _run_job(job: _Job, s, params, vq_params) -> epath.Path:
  """Samples the shards not on disk yet, then the merged .npz and the PNG grid (process 0 writes)."""
  is_main = jax.process_index() == 0
  n, bs, cfg = job.num_images, job.batch_size, job.cfg
  if is_main:
    job.out_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(str(job.out_dir / "meta.json"), job.settings)
  # Placed once for the whole job: every batch reuses the same device copies. On several processes each
  # fills its own devices' shards; each process samples its devices' share of every batch.
  rep = sharding.replicated(job.mesh)
  params = sharding.put(gpt.unstack_layers(params), rep)
  if vq_params is not None:
    vq_params = sharding.put(vq_params, rep)
  rng = sharding.put(jax.random.key(int(s.seed)), rep)
  spans = job.spans
  todo = _shards_to_do(job)
  done = n - sum(spans[i][1] - spans[i][0] for i in todo)
  if done:
    logging.info("Resuming: %d of %d samples already in %s.", done, n, job.out_dir)
  from tqdm import tqdm

  bar = tqdm(total=n, initial=done, unit="img", desc="sampling", disable=not is_main, smoothing=0.3)
  for i in todo:
    a, b = spans[i]
    labels = sample_labels(s, cfg.num_classes, np.arange(a, a + bs))  # Padded to bs past the end.
    codes = _sample_placed(params, sharding.put(labels, batch_sharding(job.mesh)), rng, cfg=cfg,
                           cfg_scale=s.cfg_scale, cfg_interval=s.cfg_interval, temperature=s.temperature,
                           top_k=s.top_k, top_p=s.top_p, first_index=a, mesh=job.mesh)
    out = {"codes": sharding.gather(codes)[:b - a], "labels": labels[:b - a]}
    if vq_params is not None:
      out["arr_0"] = _decode_images(vq_params, out["codes"], job.vq_cfg, job.mesh)
    if is_main:
      files.atomic_write(str(job.shard_path(spans[i])), lambda f: np.savez(f, **out))
    bar.update(b - a)
  bar.close()
  merged = job.out_dir / f"samples_{n}.npz"
  if is_main and (todo or not merged.exists()):
    _write_outputs(job, s, merged, vq_params is not None)
  if jax.process_count() > 1:  # Nobody returns a path before process 0 has written it.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("npp_jax.sample.sample_and_save")
  return merged


def _shards_to_do(job: _Job) -> list[int]:
  """Shards not on disk yet, as process 0 sees them: every process must run the same batches (each one
  is a collective), even where a process sees another filesystem."""
  missing = np.array([not job.shard_path(span).exists() for span in job.spans])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    missing = np.asarray(multihost_utils.broadcast_one_to_all(missing))
  return [int(i) for i in np.flatnonzero(missing)]


def _write_outputs(job: _Job, s, merged: epath.Path, images: bool) -> None:
  """The merged .npz of every shard and, with images, the PNG grid of the first samples per class."""
  paths = [job.shard_path(span) for span in job.spans]
  _merge(merged, paths, job.num_images)
  if images:
    bs = job.batch_size

    def images_of(indices):
      shards = {}
      for j in sorted(set(int(i) // bs for i in indices)):  # Each shard read once.
        with paths[j].open("rb") as f, np.load(f) as z:
          shards[j] = z["arr_0"]
      return np.stack([shards[i // bs][i % bs] for i in indices])

    all_labels = sample_labels(s, job.cfg.num_classes, np.arange(job.num_images))
    _write_grid(job.out_dir / f"samples_{job.num_images}.png", images_of, all_labels, s,
                job.cfg.num_classes)
  logging.info("Wrote %d %s to %s.", job.num_images, "images" if images else "code grids", merged)


# Images per device per VQ decode call: the decoder's activations at 256 px take ~0.2 GB per image, so a
# whole sampling batch at once could exhaust a CPU host or a small accelerator.
VQ_CHUNK_PER_DEVICE = 4


def _decode_images(vq_params, codes: np.ndarray, vq_cfg, mesh) -> np.ndarray:
  """codes [n, h, w] -> uint8 [n, H, W, 3] as the release writes samples (the ADM evaluator's format)."""
  from npp_jax.models import vq

  chunk = VQ_CHUNK_PER_DEVICE * mesh.size
  out = []
  for start in range(0, len(codes), chunk):
    piece = codes[start:start + chunk]
    padded = np.zeros((chunk, *codes.shape[1:]), np.int32)  # One shape: one compile.
    padded[:len(piece)] = piece
    images = vq.decode_fn(vq_params, sharding.put(padded, batch_sharding(mesh)), vq_cfg)
    out.append(sharding.gather(_to_uint8(images))[:len(piece)])
  return np.concatenate(out)


@jax.jit
def _to_uint8(images):
  # Truncating cast after clip(127.5 x + 128), as the release converts its samples.
  return jnp.clip(127.5 * images + 128.0, 0, 255).astype(jnp.uint8)
