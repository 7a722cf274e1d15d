"""VQ training: a tokenizer of config.vq's architecture learnt on images, on the GPT trainer's
plumbing (checkpoints.Checkpointer, checkpoints.Preemption, loop.Loop, optim.adamw, sharding).

  python -m npp_jax.main --mode=train_vq --config=configs/demo.py --workdir=W   # -> W/vq

Losses: l2_weight * MSE + l1_weight * MAE of the reconstruction, plus the quantizer's codebook and
commitment terms (and its entropy term when vq.entropy_loss_ratio > 0). LlamaGen's perceptual
(LPIPS) and adversarial (PatchGAN) losses are NOT included: reconstructions are blurrier than the
release's VQ-16, which is fine for small data (the demo's digits) and as a starting point elsewhere.

A re-run resumes from WORKDIR/vq_checkpoints; a finished run (WORKDIR/vq exists) is not trained
again.
"""

import dataclasses
import functools
from typing import Any, Callable, Iterator, Mapping, Optional

from absl import logging
from etils import epath
from etils import epy
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from npp_jax import checkpoints
from npp_jax import jobs
from npp_jax import loop
from npp_jax import optim
from npp_jax import preflight
from npp_jax import rules
from npp_jax import sharding
from npp_jax import summaries
from npp_jax.data import images as images_lib
from npp_jax.models import vq

# grain (and orbax under it) loads at first use: a bad command line fails without it.
with epy.lazy_imports():
  import grain

_USAGE_DECAY = 0.99  # EMA of the code distribution behind the running perplexity (~100 steps).


@flax.struct.dataclass
class VQTrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  code_ema: jax.Array  # [codebook_size] running distribution of the codes chosen.


SECTIONS = ("vq", "vq_train", "mesh")


@dataclasses.dataclass(frozen=True)
class VQHparams:
  """The optimisation settings of config.vq_train, hashable: they are static arguments of the
  compiled step."""

  lr: float
  b1: float
  b2: float
  weight_decay: float
  grad_clip: float
  l1_weight: float
  l2_weight: float
  seed: int

  def __post_init__(self):
    rules.check_fields(self, "vq_train", _HPARAM_RULES)
    if self.l1_weight == 0 and self.l2_weight == 0:
      raise ValueError(
        "vq_train.l1_weight and vq_train.l2_weight are both 0; expected a reconstruction "
        "loss (l2_weight=1 is the release's)"
      )

  @classmethod
  def from_config(cls, config) -> "VQHparams":
    return cls(**rules.section(config, "vq_train", cls))


_HPARAM_RULES = {
  "lr": rules.POSITIVE,
  "b1": rules.FRACTION,
  "b2": rules.FRACTION,
  "weight_decay": rules.NON_NEGATIVE,
  "grad_clip": rules.NON_NEGATIVE,
  "l1_weight": rules.NON_NEGATIVE,
  "l2_weight": rules.NON_NEGATIVE,
  "seed": rules.INT,
}


@dataclasses.dataclass(frozen=True)
class VQTrainSettings:
  """config.vq_train: the images, the loop and (hparams) the optimisation."""

  dataset: str  # "digits", a TFDS name or directory, an image folder.
  data_dir: str
  split: str
  steps: int
  batch_size: int  # Global images per step.
  random_flip: bool
  log_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  num_threads: int  # 0: min(16, CPU count).
  hparams: VQHparams

  def __post_init__(self):
    rules.check_fields(self, "vq_train", _RULES)

  @classmethod
  def from_config(cls, config) -> "VQTrainSettings":
    return cls(**rules.section(config, "vq_train", cls, hparams=VQHparams.from_config(config)))


_RULES = {
  "dataset": rules.NON_EMPTY,
  "data_dir": rules.TEXT,
  "split": rules.SPLIT,
  "steps": rules.POSITIVE_INT,
  "batch_size": rules.POSITIVE_INT,
  "random_flip": rules.BOOL,
  "log_every_steps": rules.POSITIVE_INT,
  "checkpoint_every_steps": rules.POSITIVE_INT,
  "keep_checkpoints": rules.KEEP,
  "num_threads": rules.COUNT,
}


def make_optimizer(hp: VQHparams) -> optax.GradientTransformation:
  return optim.adamw(
    hp.lr, b1=hp.b1, b2=hp.b2, weight_decay=hp.weight_decay, grad_clip=hp.grad_clip
  )


def _init_vq_state(rng, *, cfg: vq.VQConfig, hp: VQHparams) -> VQTrainState:
  # Shapes of parameters do not depend on the image size: the smallest image keeps the init cheap.
  f = cfg.downsample
  params = vq.VQModel(cfg).init(rng, jnp.zeros((1, f, f, 3)))["params"]
  return VQTrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=make_optimizer(hp).init(params),
    code_ema=jnp.zeros((cfg.codebook_size,), jnp.float32),
  )


def _perplexity(p: jax.Array) -> jax.Array:
  p = p / jnp.maximum(p.sum(), 1e-12)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


def vq_train_step(state: VQTrainState, images: jax.Array, *, cfg: vq.VQConfig, hp: VQHparams):
  """One AdamW step on uint8 images [B, S, S, 3]; returns (state, metrics)."""
  x = vq.to_float(images)
  rng = jax.random.fold_in(jax.random.key(hp.seed), state.step)

  def loss_fn(params):
    rec, codes, q = vq.VQModel(cfg).apply({"params": params}, x, train=True, rngs={"dropout": rng})
    diff = rec - x
    terms = {
      "rec_l2": jnp.mean(diff * diff),
      "rec_l1": jnp.mean(jnp.abs(diff)),
      "codebook": q["codebook"],
      "commitment": q["commitment"],
      "entropy": q["entropy"],
    }
    loss = hp.l2_weight * terms["rec_l2"] + hp.l1_weight * terms["rec_l1"] + q["quantizer"]
    return loss, (codes, terms)

  (loss, (codes, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = make_optimizer(hp).update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  counts = jnp.zeros((cfg.codebook_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
  p = counts / counts.sum()
  code_ema = jnp.where(state.step == 0, p, _USAGE_DECAY * state.code_ema + (1.0 - _USAGE_DECAY) * p)
  metrics = {
    "loss": loss,
    **terms,
    "grad_norm": optax.global_norm(grads),
    "usage_batch": jnp.mean((counts > 0).astype(jnp.float32)),  # Fraction of the codebook used.
    "perplexity_batch": _perplexity(p),
    "perplexity_running": _perplexity(code_ema),
  }
  return state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, code_ema=code_ema
  ), metrics


@functools.lru_cache(maxsize=8)
def _vq_functions(cfg: vq.VQConfig, hp: VQHparams, mesh):
  """(init, step) compiled for a mesh; cached so repeated jobs in one process compile once."""
  rep, batch = sharding.replicated(mesh), sharding.data_sharding(mesh)
  init = jax.jit(functools.partial(_init_vq_state, cfg=cfg, hp=hp), out_shardings=rep)
  step = jax.jit(
    functools.partial(vq_train_step, cfg=cfg, hp=hp),
    in_shardings=(rep, batch),
    out_shardings=(rep, rep),
    donate_argnums=0,
  )
  return init, step


# --------------------------------------------------------------------------------------------- data


def _vq_batches(
  source: images_lib.ImageSource,
  image_size: int,
  local: int,
  seed: int,
  start_step: int,
  random_flip: bool,
  threads: int,
) -> Iterator[np.ndarray]:
  """uint8 [local, S, S, 3] per step: this process's rows of the global batch, two steps ahead
  (grain).

  Random-access sources draw batch s from a generator seeded by (seed, s), so a resumed run sees the
  batches it would have seen; streamed sources reshuffle with a seed that includes the resume step.
  """
  p, n_proc = jax.process_index(), jax.process_count()

  def crop(args):
    image, flip = args
    x = images_lib.center_crop_arr(images_lib.to_rgb(image), image_size)
    return x[:, ::-1] if flip else x

  if source.random_access:

    def draw(step):
      rng = np.random.default_rng([seed, step])
      idx = rng.choice(
        source.num_examples, size=local * n_proc, replace=source.num_examples < local * n_proc
      )
      flips = (rng.random(local * n_proc) < 0.5) & random_flip
      rows = slice(p * local, (p + 1) * local)
      return source.get(idx[rows])[0], flips[rows]
  else:
    stream = source.stream(seed + 1_000_003 * start_step, p, n_proc)
    rng = np.random.default_rng([seed, start_step, p])

    def draw(step):  # Called in step order: grain reads with one thread.
      del step
      return [next(stream)[0] for _ in range(local)], (rng.random(local) < 0.5) & random_flip

  def batch(step):
    images, flips = draw(step)
    return np.stack(images_lib.parallel_map(crop, list(zip(images, flips)), threads))

  ds = grain.MapDataset.range(start_step, start_step + 2**40).map(
    batch
  )  # Endless, as the loop decides.
  it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)))
  try:
    yield from it
  finally:
    it.close()


# ---------------------------------------------------------------------------------------------- job


@dataclasses.dataclass(frozen=True)
class Settings:
  vq: vq.VQConfig
  train: VQTrainSettings
  mesh: sharding.MeshSettings


def check_settings(config, topology: jobs.Topology) -> Settings:
  """Every rule of the sections the VQ trainer reads, and its batch against the devices."""
  s = Settings(
    vq.VQConfig.from_config(rules.get(config, "vq")),
    VQTrainSettings.from_config(config),
    sharding.MeshSettings.from_config(config),
  )
  sharding.check_batch(
    s.train.batch_size,
    s.mesh,
    "vq_train.batch_size",
    num_devices=topology.num_devices,
    process_count=topology.process_count,
  )
  return s


def check(config, workdir, topology: jobs.Topology) -> Settings:
  """Every setting, the workdir and the keep count against the run's checkpoints: one-line
  ValueErrors, nothing loaded, compiled or written."""
  work = preflight.check_workdir(workdir)
  preflight.check_keep(config, "vq_train.keep_checkpoints", work / "vq_checkpoints")
  return check_settings(config, topology)


@dataclasses.dataclass(frozen=True)
class _Plan:
  settings: Settings
  source: Any
  final_dir: epath.Path
  ckpt_dir: epath.Path
  architecture: dict

  @property
  def cfg(self) -> vq.VQConfig:
    return self.settings.vq

  @property
  def hp(self) -> VQHparams:
    return self.settings.train.hparams


def _plan(config: ml_collections.ConfigDict, workdir) -> _Plan:
  """check, then the images' source and the run's checkpoints, before anything is compiled or
  written (one-line ValueErrors)."""
  s = check(config, workdir, jobs.Topology.current())
  t = s.train
  arch = checkpoints.architecture(config.vq, checkpoints.VQ_ARCH_FIELDS)
  workdir = epath.Path(workdir)
  final_dir, ckpt_dir = workdir / "vq", workdir / "vq_checkpoints"
  if final_dir.exists():
    return _Plan(s, None, final_dir, ckpt_dir, arch)
  source = images_lib.open_images(t.dataset, t.split, t.data_dir, "vq_train.dataset")
  if ckpt_dir.is_dir():
    checkpoints.Checkpointer(
      ckpt_dir, keep=t.keep_checkpoints, architecture=arch
    ).check_architecture()
  return _Plan(s, source, final_dir, ckpt_dir, arch)


def _start(p: _Plan, ckpt: checkpoints.Checkpointer, mesh) -> tuple[VQTrainState, int]:
  """The state to train from: the latest checkpoint, or a fresh one (replicated: a VQ is small)."""
  init_fn, _ = _vq_functions(p.cfg, p.hp, mesh)
  rng = jax.random.key(p.hp.seed)
  if ckpt.latest_step() is None:
    return init_fn(rng), 0
  rep = sharding.replicated(mesh)
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), jax.eval_shape(init_fn, rng)
  )
  state, _, start = ckpt.restore(abstract)
  logging.info("Resumed VQ training from step %d in %s.", start, p.ckpt_dir)
  return state, start


def _writer(config, workdir, start: int):
  is_main = jax.process_index() == 0
  writer = summaries.create_default_writer(str(workdir), just_logging=not is_main)
  if start == 0 and is_main:
    t = config.vq_train
    writer.write_hparams(
      {f"vq.{k}": str(v) for k, v in config.vq.items()}
      | {
        f"vq_train.{k}": v if isinstance(v, (int, float, str, bool)) else str(v)
        for k, v in t.items()
      }
    )
  return writer


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  on_log: Optional[Callable[[int, Mapping[str, float]], None]] = None,
) -> jobs.Result:
  """Train a VQ tokenizer of config.vq's architecture on images; outputs: "vq", WORKDIR/vq (its
  final params); stopped_early when a SIGTERM stopped it (after saving a checkpoint to resume from).

  Data parallel over the mesh's batch axes (parameters replicated). Logs losses, codebook usage in
  the batch and a running perplexity (npp_jax.summaries); orbax checkpoints under
  WORKDIR/vq_checkpoints (keep vq_train.keep_checkpoints; a re-run resumes from the latest; SIGTERM
  saves and stops). At the end the parameters go to WORKDIR/vq, a params directory (what extract and
  the sampler read); when that exists already, nothing is trained again. on_log(step, scalars) is
  called after each logged line (the demo's progress bar).
  """
  final = _train(config, workdir, on_log)
  return jobs.Result(stopped_early=final is None, outputs={} if final is None else {"vq": final})


def _train(config, workdir, on_log) -> Optional[str]:
  p = _plan(config, workdir)
  if p.source is None:
    checkpoints.load_vq_params(p.final_dir, config.vq)
    logging.info(
      "VQ already trained: %s holds its final parameters; not training again.", p.final_dir
    )
    return str(p.final_dir)
  t, cfg = config.vq_train, p.cfg
  mesh = sharding.make_mesh(config.mesh)
  ckpt = checkpoints.Checkpointer(p.ckpt_dir, keep=t.keep_checkpoints, architecture=p.architecture)
  state, start = _start(p, ckpt, mesh)
  logging.info(
    "VQ %s: %.2fM parameters, %dx%d images -> %dx%d codes of %d; %s split %s (%d images).",
    cfg.ch_mult,
    vq.count_params(cfg) / 1e6,
    cfg.image_size,
    cfg.image_size,
    *cfg.grid,
    cfg.codebook_size,
    p.source.name,
    t.split,
    p.source.num_examples,
  )
  writer = _writer(config, workdir, start)
  summaries.write_parameter_overview(state.params, workdir, is_main=jax.process_index() == 0)
  batches = _vq_batches(
    p.source,
    cfg.image_size,
    t.batch_size // jax.process_count(),
    p.hp.seed,
    start,
    t.random_flip,
    images_lib.num_threads(t.num_threads),
  )
  try:
    state, step = _loop(config, p, mesh, ckpt, writer, batches, state, start, on_log)
  finally:
    batches.close()
    ckpt.close()
    writer.flush()
  if step < t.steps:
    return None  # Stopped by SIGTERM after saving: the same command resumes.
  checkpoints.save_params(
    p.final_dir, jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), state.params)
  )
  logging.info("VQ trained for %d steps; final parameters in %s.", step, p.final_dir)
  return str(p.final_dir)


def _loop(config, p: _Plan, mesh, ckpt, writer, batches, state, start: int, on_log=None):
  t = config.vq_train
  _, step_fn = _vq_functions(p.cfg, p.hp, mesh)
  step, pending = start, None
  with checkpoints.Preemption() as preempt:
    lp = loop.Loop(
      total_steps=t.steps,
      log_every=t.log_every_steps,
      checkpoint_every=t.checkpoint_every_steps,
      writer=writer,
      preemption=preempt,
      last_saved=ckpt.latest_step,
      wait=ckpt.wait,
      reached_preemption=ckpt.reached_preemption,
      what="VQ ",
      start=start,
      on_log=on_log,
      hooks=[summaries.ReportProgress(num_train_steps=t.steps, writer=writer), ckpt.check_saves],
    )
    while step < t.steps:
      images = sharding.global_batch({"images": next(batches)}, mesh)["images"]
      if pending is not None:  # At most two steps in flight: the host cannot queue up batches.
        pending.block_until_ready()
      state, metrics = step_fn(state, images)
      pending = metrics["loss"]
      step += 1
      if lp.end_of_step(step, metrics, save=lambda s: ckpt.save(s, state, force=True)):
        break
  return state, step
