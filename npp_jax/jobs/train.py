"""train_and_evaluate(config, workdir): NPP training on any mesh, with exact resume.

Sections, in order: validate (before any compile or write), mesh, data, model and state (built sharded),
step (one compiled function per patch size k), checkpoint, loop.
"""

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping

from absl import logging
from clu import metrics as clu_metrics
from etils import epath
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from npp_jax import checkpoints
from npp_jax import costs
from npp_jax import loop
from npp_jax import npp
from npp_jax import optim
from npp_jax import sharding
from npp_jax import summaries
from npp_jax import validate
from npp_jax.data import captions
from npp_jax.data import code_dataset
from npp_jax.evaluators import sample_metrics
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
  eval_split: str | None  # The held-out split evaluated during training; None: no evaluation.


def plan(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> Plan:
  """Validate the config against the devices and the data set; one-line ValueErrors, nothing written."""
  cfg = gpt.GPTConfig.from_config(config.model)
  t, o = config.train, config.optim
  for name, value in (
    ("train.global_batch_size", t.global_batch_size),
    ("train.epochs", t.epochs),
    ("train.grad_accum_steps", t.grad_accum_steps),
    ("optim.lr", o.lr),
  ):
    if not value > 0:
      raise ValueError(f"{name}={value!r}; expected a positive number")
  if not config.npp.stages and not 0.0 < config.npp.epoch_rate < 1.0:
    raise ValueError(f"npp.epoch_rate={config.npp.epoch_rate!r}; expected a number in (0, 1)")
  if not 0.0 <= o.ema_decay < 1.0:
    raise ValueError(f"optim.ema_decay={o.ema_decay!r}; expected a number in [0, 1)")
  b = t.global_batch_size
  sharding.check_batch(
    b,
    config.mesh,
    "train.global_batch_size",
    num_devices=num_devices,
    process_count=process_count,
    micro_batches=t.grad_accum_steps,
  )
  if not config.data.path:
    raise ValueError(
      "data.path is empty; expected the directory of a code data set "
      "(python -m npp_jax.npy_codes, or --mode=extract)"
    )
  if cfg.condition == "text" and config.evaluate.every_steps:
    # Sample metrics draw class-conditional samples; a text model needs sampling from captions.
    raise ValueError(
      f"evaluate.every_steps={config.evaluate.every_steps} with model.condition='text'; expected "
      "0 (sample metrics during training are for class models)"
    )
  meta = _dataset(cfg).load_metadata(config.data.path, split="train")
  _check_dataset(meta, cfg, f"the data set {config.data.path}")
  steps_per_epoch = code_dataset.steps_per_epoch(meta.num_examples, b)
  if steps_per_epoch < 1:
    raise ValueError(
      f"train.global_batch_size={b} is larger than the data set ({meta.num_examples} "
      f"examples in {config.data.path}); expected at most {meta.num_examples}"
    )
  schedule = npp.Schedule.from_config(config, steps_per_epoch)
  schedule.learning_rate(o.lr, o.end_lr, o.warmup_epochs, o.decay_ratio)  # Validates the LR knobs.
  total = schedule.total_steps if t.max_steps <= 0 else min(t.max_steps, schedule.total_steps)
  return Plan(cfg, schedule, meta, steps_per_epoch, total, _eval_split(config, cfg))


def _dataset(cfg: gpt.GPTConfig):
  """The module that reads the model's kind of code data set: class labels, or captions."""
  return captions if cfg.condition == "text" else code_dataset


def _check_dataset(meta, cfg: gpt.GPTConfig, what: str) -> None:
  """One-line ValueErrors for a data set (split) that does not fit the model."""
  if tuple(meta.grid) != tuple(cfg.grid):
    raise ValueError(
      f"{what} holds {meta.grid[0]}x{meta.grid[1]} code grids; expected model.grid={tuple(cfg.grid)}"
    )
  if meta.max_code >= cfg.vocab_size:
    raise ValueError(
      f"{what} holds code {meta.max_code}; expected codes < model.vocab_size={cfg.vocab_size}"
    )
  if cfg.condition != "text":
    if meta.max_label >= cfg.num_classes:
      raise ValueError(
        f"{what} holds label {meta.max_label}; expected labels < model.num_classes="
        f"{cfg.num_classes}"
      )
    return
  # Batches carry the caption padded to the data set's max_length: the model's condition positions.
  got = (meta.max_length, meta.caption_dim)
  if got != (cfg.cls_token_num, cfg.caption_dim):
    raise ValueError(
      f"{what} holds captions of {got[0]} x {got[1]} features; expected model.cls_token_num="
      f"{cfg.cls_token_num} x model.caption_dim={cfg.caption_dim}"
    )
  if meta.num_valid == 0:
    raise ValueError(f"{what} holds no valid example (no image was readable); expected some")


def _eval_split(config, cfg: gpt.GPTConfig) -> str | None:
  """The split to evaluate (data.eval_split, else "test" or "validation" if the data set has one)."""
  t, path = config.train, config.data.path
  for name, low in (
    ("eval_every_steps", 0),
    ("eval_batches", 0),
    ("preemption_sync_every_steps", 1),
  ):
    if isinstance(t[name], bool) or not isinstance(t[name], int) or t[name] < low:
      raise ValueError(f"train.{name}={t[name]!r}; expected an integer >= {low}")
  split = config.data.eval_split
  if not split:
    found = [s for s in ("test", "validation") if s in code_dataset.finished_splits(path)]
    split = found[0] if found else None
  if t.eval_batches == 0 or split is None:
    return None
  meta = _dataset(cfg).load_metadata(path, validate.split_name(split, "data.eval_split"))
  _check_dataset(meta, cfg, f"split {split!r} of {path}")
  return split


# ---------------------------------------------------------------------------------------- model and step


def make_optimizer(config, schedule: npp.Schedule) -> tuple[optax.GradientTransformation, Any]:
  """(AdamW of optim.py, the per-step learning rate of the NPP schedule)."""
  o = config.optim
  lr = schedule.learning_rate(o.lr, o.end_lr, o.warmup_epochs, o.decay_ratio)
  tx = optim.adamw(
    lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip
  )
  return tx, lr


def init_state(model: gpt.GPT, tx, cfg: gpt.GPTConfig, seed: int, ema: bool):
  """A fresh TrainState with boxed (logically partitioned) leaves, so eval_shape yields its layout."""

  def init(rng):
    params = model.init(rng, *gpt.example_inputs(cfg, zeros=True))["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema=params if ema else (),
      rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
    )

  return init, jax.random.key(seed)


# The batch entries a train step reads, per model.condition (data/code_dataset.py, data/captions.py).
BATCH_KEYS = {"class": ("codes", "labels"), "text": ("codes", "caption", "caption_len", "valid")}


def model_inputs(batch: dict, cfg: gpt.GPTConfig) -> tuple[Any, dict]:
  """(condition, keyword arguments) of GPT for a batch: a class batch's labels, or a caption batch's
  right-aligned features [B, T, caption_dim] with the mask their lengths make."""
  if cfg.condition != "text":
    return batch["labels"], {}
  t = batch["caption"].shape[1]
  mask = jnp.arange(t)[None, :] >= t - batch["caption_len"][:, None]  # Left padding, LlamaGen's.
  return batch["caption"], {"caption_mask": mask}


def train_step(
  state: TrainState,
  batch: dict,
  *,
  model: gpt.GPT,
  tx,
  lr_fn,
  k: int,
  accum: int,
  ema_decay: float = 0.0,
):
  """One optimizer step on a global batch, accumulating `accum` micro-batches; returns (state, metrics).

  A caption batch's invalid examples (unreadable images) are left out of the loss: it is the mean
  over the valid examples of the whole global batch, whichever micro-batch holds them."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  inputs = {key: batch[key] for key in BATCH_KEYS[model.cfg.condition]}
  num_valid = jnp.maximum(inputs["valid"].sum(), 1) if "valid" in inputs else None

  def loss_fn(params, micro, rng):
    codes = micro["codes"]
    cond, kw = model_inputs(micro, model.cfg)
    logits = model.apply(
      {"params": params}, codes, cond, **kw, patch_size=k, train=True, rngs={"dropout": rng}
    )
    targets = npp.group_targets(codes, k)
    if num_valid is None:
      return npp.patch_loss(logits, targets)
    valid = micro["valid"]
    loss = npp.patch_loss(logits, targets, jnp.broadcast_to(valid[:, None], logits.shape[:2]))
    # The micro-batch's share of the valid examples (times accum, which the mean below divides out).
    return loss * (valid.sum() * accum / num_valid)

  grad_fn = jax.value_and_grad(loss_fn)
  if accum == 1:
    loss, grads = grad_fn(state.params, inputs, rng)
  else:
    # Micro-batch i takes rows i, i + accum, ...: every device keeps an equal share of each micro-batch.
    split = lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    micro = (jax.tree.map(split, inputs), jnp.arange(accum))

    def body(carry, xs):
      m, i = xs
      loss, grads = grad_fn(state.params, m, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(body, zeros, micro)
    loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema_decay > 0:
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    ema = optim.keep_frozen(ema, params)  # A fixed tensor (the null caption) stays bit-exact.
  metrics = {
    "loss": loss,
    "grad_norm": optax.global_norm(grads),
    "param_norm": optax.global_norm(params),
    "lr": lr_fn(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics


# ------------------------------------------------------------------------------------------ evaluation


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  """Held-out averages over the real images (clu.metrics: masked sums merged across batches)."""

  nll: clu_metrics.Average.from_output("nll")  # k = 1 NLL, nats per token.
  class_info: clu_metrics.Average.from_output("class_info")  # Null minus true NLL, nats per image.


def eval_step(params, batch: dict, *, model: gpt.GPT, num_classes: int) -> EvalMetrics:
  """k = 1 NLL with the true condition and with the null one (the null class, or the null caption
  under the caption's mask), over the batch's real rows (mask; of a caption batch, valid ones)."""
  codes = batch["codes"]
  targets = codes.reshape(codes.shape[0], -1)
  cond, kw = model_inputs(batch, model.cfg)
  mask = batch["mask"].astype(bool)
  if model.cfg.condition == "text":
    mask = mask & batch["valid"].astype(bool)
    null_cond, null_kw = cond, {**kw, "null_caption": jnp.ones(codes.shape[:1], bool)}
  else:
    null_cond, null_kw = jnp.full_like(cond, num_classes), kw

  def image_nll(c, extra):  # [B]: the sum over the image's tokens.
    logits = model.apply({"params": params}, codes, c, **extra, patch_size=1, train=False)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].sum(-1)

  nll, null = image_nll(cond, kw), image_nll(null_cond, null_kw)
  return EvalMetrics.single_from_model_output(
    nll=nll / targets.shape[1], class_info=null - nll, mask=mask
  )


class Evaluator:
  """Held-out k = 1 NLL (nats per token) and class information (null-class NLL minus true-class NLL, nats
  per image) on the first `max_batches` batches of a split, read once and kept on the host: every
  evaluation of a run sees the same images, so its curve compares like with like."""

  def __init__(
    self,
    model: gpt.GPT,
    mesh,
    params_sharding,
    path: str,
    split: str,
    batch_size: int,
    max_batches: int,
  ):
    self.mesh, self.path, self.split = mesh, path, split
    self.batch_size, self.max_batches = batch_size, max_batches
    self.cfg = model.cfg
    self.seconds = 0.0  # Time spent evaluating: the trainer leaves it out of its step time.
    self._batches = None
    self._fn = jax.jit(
      functools.partial(eval_step, model=model, num_classes=model.cfg.num_classes),
      in_shardings=(params_sharding, sharding.data_sharding(mesh)),
    )

  def __call__(self, params) -> dict[str, float]:
    t0 = time.perf_counter()
    if self._batches is None:
      it = _dataset(self.cfg).make_eval_iterator(
        self.path,
        batch_size=self.batch_size,
        split=self.split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
      self._batches = [b for _, b in zip(range(self.max_batches), it)]
    total = EvalMetrics.empty()
    for local in self._batches:
      total = total.merge(self._fn(params, sharding.global_batch(local, self.mesh)))
    out = jax.device_get(total.compute())
    self.seconds += time.perf_counter() - t0
    return {"eval/nll": float(out["nll"]), "eval/class_info": float(out["class_info"])}


# ------------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class _Run:
  """What the sections below share: mesh, model, optimizer and the (sharded) state being trained."""

  mesh: Any
  axis_rules: Any
  model: gpt.GPT
  tx: Any
  lr_fn: Any
  state: TrainState
  state_sharding: Any
  abstract_state: Any


def train_and_evaluate(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  on_log: Callable[[int, Mapping[str, float]], None] | None = None,
) -> dict:
  """Train until the schedule (or train.max_steps) ends; re-running the same command resumes.

  Returns the last logged scalars and the last evaluation ("eval/nll", "eval/class_info"), with "step"
  and "stopped_early" (True when a SIGTERM stopped it after saving). on_log(step, scalars) is called after
  every log line (a console progress bar).
  """
  # From here on a SIGTERM asks for a save and a stop at the loop's next agreed step, however early it
  # comes (restoring, compiling): a process that died alone would leave the others in a collective.
  with checkpoints.Preemption() as preempt:
    return _train(config, workdir, preempt, on_log)


def _train(config, workdir, preempt, on_log) -> dict:
  # Validate: nothing is compiled or written before this passes.
  p = plan(config, jax.device_count(), jax.process_count())
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  ckpt, init_params = _open_checkpoints(config, ckpt_dir)
  scorer = sample_metrics.prepare(config, workdir, p)  # FID etc. of samples; None when off.
  it = _dataset(p.cfg).make_train_iterator(
    config.data.path,
    global_batch_size=config.train.global_batch_size,
    seed=config.data.shuffle_seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    worker_count=config.data.worker_count,
  )
  run = _build(config, p)
  if ckpt is None:
    ckpt = checkpoints.Checkpointer(
      ckpt_dir,
      keep=config.train.keep_checkpoints,
      architecture=checkpoints.architecture(config.model),
    )
  start = _resume(config, run, ckpt, init_params, it)
  steps = _CompiledSteps(config, run)
  evaluator = None
  if p.eval_split is not None:
    evaluator = Evaluator(
      run.model,
      run.mesh,
      run.state_sharding.params,
      config.data.path,
      p.eval_split,
      config.train.global_batch_size // config.train.grad_accum_steps,
      config.train.eval_batches,
    )
  writer, hooks = _writer(config, workdir, p.total_steps, start)
  summaries.write_parameter_overview(run.state.params, workdir, is_main=jax.process_index() == 0)
  logging.info(
    "Model %s: %.1fM parameters; schedule %s; %d steps/epoch, %d steps; token ratio %.3f, "
    "FLOP ratio %.3f vs next-token training.",
    config.model.name,
    gpt.count_params(p.cfg) / 1e6,
    [(s.k, s.epochs) for s in p.schedule.stages],
    p.steps_per_epoch,
    p.total_steps,
    p.schedule.token_ratio(),
    costs.schedule_flop_ratio(p.schedule, p.cfg),
  )
  t_loop = time.perf_counter()
  step, last = _loop(
    config, p, run, it, ckpt, steps, evaluator, writer, hooks, start, preempt, on_log, scorer
  )
  ckpt.close()
  writer.flush()
  wall, compile_s = time.perf_counter() - t_loop, steps.compile_s()
  return {
    "step": step,
    **last,
    "loop_s": wall,
    "compile_s": compile_s,
    "train_s": wall - compile_s,
    "stopped_early": step < p.total_steps,
  }


def _open_checkpoints(config, ckpt_dir: epath.Path):
  """(Checkpointer of an existing run or None, init_from parameters or None), checked before any compile."""
  ckpt = None
  if ckpt_dir.is_dir():
    ckpt = checkpoints.Checkpointer(
      ckpt_dir,
      keep=config.train.keep_checkpoints,
      architecture=checkpoints.architecture(config.model),
    )
    ckpt.check_architecture()
  init_params = None
  if config.train.init_from and (ckpt is None or ckpt.latest_step() is None):
    init_params = checkpoints.load_params(config.train.init_from)
    checkpoints.check_param_shapes(
      init_params,
      gpt.param_shapes(config.model),
      f"train.init_from={config.train.init_from!r} holds parameters of another model (expected the "
      f"shapes of model {config.model.name})",
    )
  return ckpt, init_params


def _build(config, p: Plan) -> _Run:
  """Mesh, model, optimizer and a fresh state created already sharded (eval_shape, then jit)."""
  mesh = sharding.make_mesh(config.mesh)
  axis_rules = sharding.rules(config.mesh)
  model = gpt.GPT(p.cfg)
  tx, lr_fn = make_optimizer(config, p.schedule)
  init_fn, rng = init_state(model, tx, p.cfg, config.seed, config.optim.ema_decay > 0)
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    abstract = jax.eval_shape(init_fn, rng)
    state_sharding = sharding.logical_shardings(abstract, mesh, axis_rules)
    state = jax.jit(lambda r: nn.unbox(init_fn(r)), out_shardings=state_sharding)(rng)
  abstract_state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nn.unbox(abstract),
    state_sharding,
  )
  return _Run(mesh, axis_rules, model, tx, lr_fn, state, state_sharding, abstract_state)


def _resume(config, run: _Run, ckpt, init_params, it) -> int:
  """The step to start from: the latest checkpoint's (state and data position restored), else 0."""
  if ckpt.latest_step() is not None:
    run.state, data_state, start = ckpt.restore(run.abstract_state)
    code_dataset.restore_iterator(it, data_state)
    logging.info("Resumed from step %d in %s.", start, ckpt.directory)
    return start
  if init_params is not None:
    params = jax.tree.map(
      lambda x, s: jax.device_put(jnp.asarray(x, s.dtype), s.sharding),
      _layout_like(init_params, run.model.cfg),
      run.abstract_state.params,
    )
    run.state = run.state.replace(params=params, ema=params if run.state.ema != () else ())
    logging.info("Initialised parameters from %s.", config.train.init_from)
  return 0


class _CompiledSteps:
  """One step per k, compiled ahead of time on first use and kept for the whole stage, so its cost and
  memory are logged apart from the steps."""

  def __init__(self, config, run: _Run):
    self.config, self.run = config, run
    self.batch_sharding = sharding.data_sharding(run.mesh)
    self._steps, self._compile_s = {}, {}

  def compile_s(self) -> float:
    return sum(self._compile_s.values())

  def __call__(self, k: int, state, batch):
    if k not in self._steps:
      r = self.run
      fn = functools.partial(
        train_step,
        model=r.model,
        tx=r.tx,
        lr_fn=r.lr_fn,
        k=k,
        accum=self.config.train.grad_accum_steps,
        ema_decay=float(self.config.optim.ema_decay),
      )
      t0 = time.perf_counter()
      self._steps[k] = (
        jax.jit(
          fn,
          in_shardings=(r.state_sharding, self.batch_sharding),
          out_shardings=(r.state_sharding, None),
          donate_argnums=0,
        )
        .lower(state, batch)
        .compile()
      )
      self._compile_s[k] = time.perf_counter() - t0
      mem = self._steps[k].memory_analysis()
      logging.info(
        "Compiled the k=%d step in %.1f s%s.",
        k,
        self._compile_s[k],
        f"; per device: {mem.argument_size_in_bytes / 2**20:.0f} MiB arguments, "
        f"{mem.temp_size_in_bytes / 2**20:.0f} MiB temporaries"
        if mem
        else "",
      )
    return self._steps[k]


def _writer(config, workdir, total_steps: int, start: int):
  """Metric writer (TensorBoard on process 0, logging elsewhere) and the progress / profile hooks."""
  is_main = jax.process_index() == 0
  writer = summaries.create_default_writer(str(workdir), just_logging=not is_main)
  if start == 0 and is_main:
    writer.write_hparams(_flat_hparams(config))
  hooks = [summaries.ReportProgress(num_train_steps=total_steps, writer=writer)]
  if config.train.profile and is_main:
    hooks.append(summaries.Profile(num_profile_steps=5, logdir=str(workdir)))
  return writer, hooks


def _throughput(config, p: Plan, peak, k: int, step: int, step_s: float) -> dict:
  """The log line's scalars beside the step's metrics: k, speed, cost so far, epoch, MFU."""
  b = config.train.global_batch_size
  out = {
    "k": k,
    "tokens_per_s": b * npp.num_patches(p.cfg.grid, k) / step_s,
    "relative_cost": costs.cumulative_relative_cost(p.schedule, p.cfg, step),
    "epoch": step / p.steps_per_epoch,
  }
  util = costs.mfu(costs.train_step_flops(p.cfg, k, b).total, step_s, jax.device_count(), peak)
  if util is not None:
    out["mfu"] = util
  return out


def _loop(
  config,
  p: Plan,
  run: _Run,
  it,
  ckpt,
  steps: _CompiledSteps,
  evaluator,
  writer,
  hooks,
  start: int,
  preempt,
  on_log,
  scorer=None,
):
  """Steps until the end of the schedule or a preemption; returns (last step, last logged scalars)."""
  peak = costs.peak_flops_per_device(override=config.train.peak_flops_per_device)
  t, step, last_eval = config.train, start, {}
  eval_at = {s.end_step for s in p.schedule.stages} | {
    p.total_steps
  }  # And every t.eval_every_steps.
  with jax.set_mesh(run.mesh), nn.logical_axis_rules(run.axis_rules):
    lp = loop.Loop(
      total_steps=p.total_steps,
      log_every=t.log_every_steps,
      checkpoint_every=t.checkpoint_every_steps,
      writer=writer,
      preemption=preempt,
      last_saved=ckpt.latest_step,
      wait=ckpt.wait,
      reached_preemption=ckpt.reached_preemption,
      hooks=[*hooks, ckpt.check_saves],
      start=start,
      sync_every=t.preemption_sync_every_steps,
      on_log=on_log,
      excluded_s=lambda: (
        steps.compile_s()
        + (evaluator.seconds if evaluator else 0.0)
        + (scorer.seconds if scorer else 0.0)
      ),
    )
    while step < p.total_steps:
      k = p.schedule.k_at(step)
      local = next(it)
      batch = {key: local[key] for key in BATCH_KEYS[p.cfg.condition]}
      batch = sharding.global_batch(batch, run.mesh)
      run.state, metrics = steps(k, run.state, batch)(run.state, batch)
      step += 1
      save = lambda s: ckpt.save(s, run.state, code_dataset.iterator_state(it), force=True)
      if lp.end_of_step(
        step,
        metrics,
        save,
        extra=functools.partial(_throughput, config, p, peak, k),
        note=f" (k={k})",
      ):
        break
      if evaluator is not None and (
        step in eval_at or (t.eval_every_steps and step % t.eval_every_steps == 0)
      ):
        last_eval = _evaluate(evaluator, run.state.params, p, step, writer)
      if scorer is not None and scorer.due(step):
        last_eval = {**last_eval, **scorer(run.state, step, writer)}
  return step, {**lp.last, **last_eval}


def _evaluate(evaluator: Evaluator, params, p: Plan, step: int, writer) -> dict:
  """One held-out evaluation, written under eval/ beside the cost so far (quality against cost)."""
  out = evaluator(params)
  out["eval/relative_cost"] = costs.cumulative_relative_cost(p.schedule, p.cfg, step)
  out["eval/epoch"] = step / p.steps_per_epoch
  writer.write_scalars(step, out)
  logging.info(
    "Step %d: held-out NLL %.4f nats/token, class information %.3f nats/image (%s split).",
    step,
    out["eval/nll"],
    out["eval/class_info"],
    evaluator.split,
  )
  return {"eval/nll": out["eval/nll"], "eval/class_info": out["eval/class_info"]}


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
