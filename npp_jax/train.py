"""train_and_evaluate(config, workdir): NPP training on any mesh, with exact resume.

Sections, in order: validate (before any compile or write), mesh, data, model and state (built sharded),
step (one compiled function per patch size k), checkpoint, loop.
"""
import dataclasses
import functools
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers
from clu import periodic_actions

from npp_jax import checkpoints
from npp_jax import costs
from npp_jax import data
from npp_jax import npp
from npp_jax import sharding
from npp_jax.models import gpt


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any  # () when the EMA is off, so it costs no memory.
  rng: jax.Array  # Raw uint32 key data: checkpointable as a plain array.


# ------------------------------------------------------------------------------------------- validation

@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything decided before compiling: sizes, schedule, data facts."""
  cfg: gpt.GPTConfig
  schedule: npp.Schedule
  meta: Any
  steps_per_epoch: int
  total_steps: int


def plan(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> Plan:
  """Validate the config against the devices and the data set; one-line ValueErrors, nothing written."""
  cfg = gpt.GPTConfig.from_config(config.model)
  t, o = config.train, config.optim
  for name, value in (("train.global_batch_size", t.global_batch_size), ("train.epochs", t.epochs),
                      ("train.grad_accum_steps", t.grad_accum_steps), ("optim.lr", o.lr)):
    if not value > 0:
      raise ValueError(f"{name}={value!r}; expected a positive number")
  if not config.npp.stages and not 0.0 < config.npp.epoch_rate < 1.0:
    raise ValueError(f"npp.epoch_rate={config.npp.epoch_rate!r}; expected a number in (0, 1)")
  if not 0.0 <= o.ema_decay < 1.0:
    raise ValueError(f"optim.ema_decay={o.ema_decay!r}; expected a number in [0, 1)")
  mesh_shape = sharding.mesh_shape(config.mesh.shape, num_devices)
  dp = mesh_shape[0] * mesh_shape[1]
  b = t.global_batch_size
  if b % t.grad_accum_steps or (b // t.grad_accum_steps) % dp:
    raise ValueError(f"train.global_batch_size={b} with grad_accum_steps={t.grad_accum_steps} does not "
                     f"split over the data-parallel size {dp} (mesh {mesh_shape}); expected a multiple "
                     f"of {dp * t.grad_accum_steps}")
  if b % process_count:
    raise ValueError(f"train.global_batch_size={b}; expected a multiple of the {process_count} processes")
  if not config.data.path:
    raise ValueError("data.path is empty; expected the directory of a code data set "
                     "(python -m npp_jax.data, or --mode=extract)")
  meta = data.load_metadata(config.data.path, split="train")
  if tuple(meta.grid) != tuple(cfg.grid):
    raise ValueError(f"the data set {config.data.path} holds {meta.grid[0]}x{meta.grid[1]} code grids; "
                     f"expected model.grid={tuple(cfg.grid)}")
  if meta.max_code >= cfg.vocab_size:
    raise ValueError(f"the data set {config.data.path} holds code {meta.max_code}; expected codes "
                     f"< model.vocab_size={cfg.vocab_size}")
  if meta.max_label >= cfg.num_classes:
    raise ValueError(f"the data set {config.data.path} holds label {meta.max_label}; expected labels "
                     f"< model.num_classes={cfg.num_classes}")
  steps_per_epoch = data.steps_per_epoch(meta.num_examples, b)
  if steps_per_epoch < 1:
    raise ValueError(f"train.global_batch_size={b} is larger than the data set ({meta.num_examples} "
                     f"examples in {config.data.path}); expected at most {meta.num_examples}")
  schedule = npp.Schedule.from_config(config, steps_per_epoch)
  schedule.learning_rate(o.lr, o.end_lr, o.warmup_epochs, o.decay_ratio)  # Validates the LR knobs.
  total = schedule.total_steps if t.max_steps <= 0 else min(t.max_steps, schedule.total_steps)
  return Plan(cfg, schedule, meta, steps_per_epoch, total)


# ---------------------------------------------------------------------------------------- model and step

def make_optimizer(config, schedule: npp.Schedule) -> tuple[optax.GradientTransformation, Any]:
  o = config.optim
  lr = schedule.learning_rate(o.lr, o.end_lr, o.warmup_epochs, o.decay_ratio)
  # Weight decay only on >= 2-D weights (matrices and embeddings), as the release.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
      optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
      optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, mask=decay_mask))
  return tx, lr


def init_state(model: gpt.GPT, tx, cfg: gpt.GPTConfig, seed: int, ema: bool):
  """A fresh TrainState with boxed (logically partitioned) leaves, so eval_shape yields its layout."""
  def init(rng):
    h, w = cfg.grid
    params = model.init(rng, jnp.zeros((1, h, w), jnp.int32), jnp.zeros((1,), jnp.int32))["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema=params if ema else (),
                      rng=jax.random.key_data(jax.random.fold_in(rng, 1)))
  return init, jax.random.key(seed)


def train_step(state: TrainState, batch: dict, *, model: gpt.GPT, tx, lr_fn, k: int, accum: int,
               ema_decay: float = 0.0):
  """One optimizer step on a global batch, accumulating `accum` micro-batches; returns (state, metrics)."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params, codes, labels, rng):
    logits = model.apply({"params": params}, codes, labels, patch_size=k, train=True,
                         rngs={"dropout": rng})
    return npp.patch_loss(logits, npp.group_targets(codes, k))

  grad_fn = jax.value_and_grad(loss_fn)
  codes, labels = batch["codes"], batch["labels"]
  if accum == 1:
    loss, grads = grad_fn(state.params, codes, labels, rng)
  else:
    # Micro-batch i takes rows i, i + accum, ...: every device keeps an equal share of each micro-batch.
    split = lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    micro = (split(codes), split(labels), jnp.arange(accum))

    def body(carry, xs):
      c, l, i = xs
      loss, grads = grad_fn(state.params, c, l, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(body, zeros, micro)
    loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema_decay > 0:
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
  metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "param_norm": optax.global_norm(params),
             "lr": lr_fn(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


# ------------------------------------------------------------------------------------------------- loop

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train until the schedule (or train.max_steps) ends; re-running the same command resumes."""
  # --- validate: nothing is compiled or written before this passes.
  p = plan(config, jax.device_count(), jax.process_count())
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = None
  if os.path.isdir(ckpt_dir):
    ckpt = checkpoints.Checkpointer(ckpt_dir, keep=config.train.keep_checkpoints,
                                    architecture=checkpoints.architecture(config.model))
    ckpt.check_architecture()
  init_params = None
  if config.train.init_from and (ckpt is None or ckpt.latest_step() is None):
    init_params = checkpoints.load_params(config.train.init_from)
    _check_params_match(init_params, config)

  # --- mesh and data.
  mesh = sharding.make_mesh(config.mesh)
  axis_rules = sharding.rules(config.mesh)
  cfg, schedule = p.cfg, p.schedule
  it = data.make_train_iterator(
      config.data.path, global_batch_size=config.train.global_batch_size,
      seed=config.data.shuffle_seed, process_index=jax.process_index(),
      process_count=jax.process_count(), worker_count=config.data.worker_count)

  # --- model and state, created already sharded.
  model = gpt.GPT(cfg)
  tx, lr_fn = make_optimizer(config, schedule)
  init_fn, rng = init_state(model, tx, cfg, config.seed, config.optim.ema_decay > 0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    abstract = jax.eval_shape(init_fn, rng)
    state_sharding = sharding.logical_shardings(abstract, mesh, axis_rules)
    state = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=state_sharding)(rng)
  abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                nn.unbox(abstract), state_sharding)
  batch_sharding = sharding.data_sharding(mesh)

  # --- checkpoint: resume, or start from init_from.
  os.makedirs(ckpt_dir, exist_ok=True)
  if ckpt is None:
    ckpt = checkpoints.Checkpointer(ckpt_dir, keep=config.train.keep_checkpoints,
                                    architecture=checkpoints.architecture(config.model))
  start = 0
  if ckpt.latest_step() is not None:
    state, data_state, start = ckpt.restore(abstract_state)
    data.restore_iterator(it, data_state)
    logging.info("Resumed from step %d in %s.", start, ckpt_dir)
  elif init_params is not None:
    params = jax.tree.map(lambda x, s: jax.device_put(jnp.asarray(x, s.dtype), s.sharding),
                          _layout_like(init_params, cfg), abstract_state.params)
    state = state.replace(params=params, ema=params if state.ema != () else ())
    logging.info("Initialised parameters from %s.", config.train.init_from)

  # --- one compiled step per k, reused for the whole stage; compiled ahead of time so its cost and
  # memory are logged apart from the steps.
  accum = config.train.grad_accum_steps
  steps, compile_s = {}, {}

  def compiled_step(k, state, batch):
    if k not in steps:
      fn = functools.partial(train_step, model=model, tx=tx, lr_fn=lr_fn, k=k, accum=accum,
                             ema_decay=float(config.optim.ema_decay))
      t0 = time.perf_counter()
      steps[k] = jax.jit(fn, in_shardings=(state_sharding, batch_sharding),
                         out_shardings=(state_sharding, None), donate_argnums=0).lower(state, batch).compile()
      compile_s[k] = time.perf_counter() - t0
      mem = steps[k].memory_analysis()
      logging.info("Compiled the k=%d step in %.1f s%s.", k, compile_s[k],
                   f"; per device: {mem.argument_size_in_bytes / 2**20:.0f} MiB arguments, "
                   f"{mem.temp_size_in_bytes / 2**20:.0f} MiB temporaries" if mem else "")
    return steps[k]

  # --- logging.
  is_main = jax.process_index() == 0
  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  if start == 0 and is_main:
    writer.write_hparams(_flat_hparams(config))
  hooks = [periodic_actions.ReportProgress(num_train_steps=p.total_steps, writer=writer)]
  if config.train.profile and is_main:
    hooks.append(periodic_actions.Profile(num_profile_steps=5, logdir=workdir))
  peak = costs.peak_flops_per_device(override=config.train.peak_flops_per_device)
  logging.info("Model %s: %.1fM parameters; schedule %s; %d steps/epoch, %d steps; token ratio %.3f, "
               "FLOP ratio %.3f vs next-token training.", config.model.name,
               gpt.count_params(cfg) / 1e6, [(s.k, s.epochs) for s in schedule.stages],
               p.steps_per_epoch, p.total_steps, schedule.token_ratio(),
               costs.schedule_flop_ratio(schedule, cfg))

  # --- loop.
  last = {}
  t_log, step_log, compiled_log = time.time(), start, 0.0
  t_loop = time.perf_counter()
  step = start
  with checkpoints.Preemption() as preempt, jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    while step < p.total_steps:
      k = schedule.k_at(step)
      local = next(it)
      batch = sharding.global_batch({"codes": local["codes"], "labels": local["labels"]}, mesh)
      state, metrics = compiled_step(k, state, batch)(state, batch)
      step += 1
      for hook in hooks:
        hook(step)
      log_now = step % config.train.log_every_steps == 0 or step == p.total_steps
      # Read the flag once: a SIGTERM landing mid-save stops the loop one step later, after its own save.
      stop = preempt.requested or ckpt.reached_preemption(step)
      save_now = stop or step % config.train.checkpoint_every_steps == 0 or step == p.total_steps
      if log_now or save_now:
        # Checked before every save too (param_norm is of the updated parameters), so no checkpoint ever
        # holds non-finite weights, whatever the log and checkpoint intervals.
        metrics = jax.device_get(metrics)
        if not all(np.isfinite(v) for v in metrics.values()):
          ckpt.wait()
          raise FloatingPointError(
              f"non-finite metrics at step {step} (k={k}): {metrics}; stopped without saving, the last "
              f"good checkpoint is step {ckpt.latest_step()} in {ckpt_dir}")
      if log_now:
        # Seconds per step since the last log, less any compilation that fell in between.
        compiled = sum(compile_s.values())
        dt = (time.time() - t_log - (compiled - compiled_log)) / max(step - step_log, 1)
        t_log, step_log, compiled_log = time.time(), step, compiled
        flops = costs.train_step_flops(cfg, k, config.train.global_batch_size).total
        last = {**{k_: float(v) for k_, v in metrics.items()}, "k": k, "step_s": dt,
                "tokens_per_s": config.train.global_batch_size * npp.num_patches(cfg.grid, k) / dt,
                "relative_cost": costs.cumulative_relative_cost(schedule, cfg, step),
                "epoch": step / p.steps_per_epoch}
        util = costs.mfu(flops, dt, jax.device_count(), peak)
        if util is not None:
          last["mfu"] = util
        writer.write_scalars(step, last)
      if stop:
        logging.warning("Preemption requested: saving step %d and stopping.", step)
      if save_now:
        ckpt.save(step, state, data.iterator_state(it), force=True)
      if stop:
        break
  ckpt.close()
  writer.flush()
  wall = time.perf_counter() - t_loop
  return {"step": step, **last, "loop_s": wall, "compile_s": sum(compile_s.values()),
          "train_s": wall - sum(compile_s.values()), "stopped_early": step < p.total_steps}


def _check_params_match(params, config) -> None:
  want = gpt.param_shapes(config.model)
  got = {"/".join(str(getattr(q, "key", q)) for q in path): tuple(np.shape(x))
         for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  if got != want:
    bad = sorted(set(got.items()) ^ set(want.items()))[:4]
    raise ValueError(f"train.init_from={config.train.init_from!r} holds parameters of another model "
                     f"(first differences: {bad}); expected the shapes of model {config.model.name}")


def _layout_like(params, cfg: gpt.GPTConfig):
  return gpt.stack_layers(params, cfg.n_layer) if cfg.scan_layers else params


def _flat_hparams(config) -> dict:
  out = {}

  def walk(prefix, node):
    for key, value in node.items():
      name = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        walk(name + ".", value)
      elif isinstance(value, (int, float, str, bool)):
        out[name] = value
      else:
        out[name] = str(value)
  walk("", config)
  return out
