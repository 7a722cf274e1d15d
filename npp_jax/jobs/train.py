"""The training job: NPP training on any mesh, with exact resume (`run`).

Sections, in order: settings and check (before any compile or write), mesh, data, model and state
(built sharded), step (one compiled function per patch size k), checkpoint, loop.
"""

import dataclasses
import functools
import time
from typing import Any, Callable, Mapping

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from npp_jax import checkpoints
from npp_jax import costs
from npp_jax import data as datasets
from npp_jax import jobs
from npp_jax import loop
from npp_jax import npp
from npp_jax import optim
from npp_jax import preflight
from npp_jax import rules
from npp_jax import sharding
from npp_jax import summaries
from npp_jax import train_step as step_lib
from npp_jax.data import code_dataset
from npp_jax.evaluators import heldout_nll
from npp_jax.evaluators import sample_metrics
from npp_jax.models import gpt

SECTIONS = ("model", "npp", "optim", "train", "data", "mesh", *sample_metrics.SECTIONS)


# ------------------------------------------------------------------------------- settings and check


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """config.train, and config.seed (the initial parameters' and the dropout's)."""

  seed: int
  epochs: float
  global_batch_size: int  # Per optimizer step, split into grad_accum_steps micro-batches.
  grad_accum_steps: int
  max_steps: int  # -1: the whole schedule.
  log_every_steps: int
  checkpoint_every_steps: int
  keep_checkpoints: int
  init_from: str
  profile: bool
  peak_flops_per_device: float
  eval_every_steps: int
  eval_batches: int
  preemption_sync_every_steps: int

  def __post_init__(self):
    rules.check("seed", self.seed, rules.INT)
    rules.check_fields(self, "train", _RULES)

  @classmethod
  def from_config(cls, config) -> "TrainSettings":
    return cls(**rules.section(config, "train", cls, seed=rules.get(config, "seed")))


_RULES = {
  "epochs": rules.POSITIVE,
  "global_batch_size": rules.POSITIVE_INT,
  "grad_accum_steps": rules.POSITIVE_INT,
  "max_steps": (
    "-1 (the whole schedule) or a positive integer",
    lambda v: rules.is_int(v) and (v == -1 or v >= 1),
  ),
  "log_every_steps": rules.POSITIVE_INT,
  "checkpoint_every_steps": rules.POSITIVE_INT,
  "keep_checkpoints": rules.KEEP,
  "init_from": rules.TEXT,
  "profile": rules.BOOL,
  "peak_flops_per_device": rules.NON_NEGATIVE,
  "eval_every_steps": rules.COUNT,
  "eval_batches": rules.COUNT,
  "preemption_sync_every_steps": rules.POSITIVE_INT,
}


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every section the trainer reads, checked."""

  model: gpt.GPTConfig
  npp: npp.NPPSettings
  optim: optim.OptimSettings
  train: TrainSettings
  data: code_dataset.DataSettings
  mesh: sharding.MeshSettings
  sample_metrics: Any  # sample_metrics.SampleMetricsSettings, or None (evaluate.every_steps = 0).


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything decided before compiling: the settings, the schedule and the data's facts."""

  settings: Settings
  schedule: npp.Schedule
  meta: Any  # code_dataset.CodeDatasetMetadata of the train split.
  steps_per_epoch: int
  total_steps: int
  eval_split: str | None  # The held-out split evaluated during training; None: no evaluation.

  @property
  def model(self) -> gpt.GPTConfig:
    return self.settings.model


def check_settings(config, topology: jobs.Topology) -> Settings:
  """Every rule of every section the trainer reads (the sample metrics' with
  evaluate.every_steps)."""
  s = Settings(
    gpt.GPTConfig.from_config(rules.get(config, "model")),
    npp.NPPSettings.from_config(config),
    optim.OptimSettings.from_config(config),
    TrainSettings.from_config(config),
    code_dataset.DataSettings.from_config(config),
    sharding.MeshSettings.from_config(config),
    None,
  )
  sharding.check_batch(
    s.train.global_batch_size,
    s.mesh,
    "train.global_batch_size",
    num_devices=topology.num_devices,
    process_count=topology.process_count,
    micro_batches=s.train.grad_accum_steps,
  )
  metrics = sample_metrics.check_settings(config, s.model, s.optim.ema_decay, topology)
  return dataclasses.replace(s, sample_metrics=metrics)


def check(config, workdir, topology: jobs.Topology) -> Plan:
  """Every setting, the workdir, the weights and the code data set's facts against the model and the
  devices: one-line ValueErrors, nothing loaded, compiled or written."""
  work = preflight.check_workdir(workdir)
  preflight.check_keep(config, "train.keep_checkpoints", work / "checkpoints")
  s = check_settings(config, topology)
  if s.sample_metrics is not None:
    sample_metrics.check(config, s.model, s.optim.ema_decay, topology)
  if not s.data.path:
    raise ValueError(
      "data.path is empty; expected the directory of a code data set (python -m "
      "npp_jax.npy_codes, or --mode=extract)"
    )
  if s.train.init_from:
    preflight.expect_weights(
      "train.init_from", s.train.init_from, preflight.GPT_KINDS, preflight.GPT_WANTED
    )
  meta = _check_data(s, "train", s.data.path)
  steps_per_epoch = code_dataset.steps_per_epoch(meta.num_examples, s.train.global_batch_size)
  if steps_per_epoch < 1:
    raise ValueError(
      f"train.global_batch_size={s.train.global_batch_size} is larger than the data set "
      f"({meta.num_examples} examples in {s.data.path}); expected at most {meta.num_examples}"
    )
  stages = s.npp.stages_for(s.train.epochs)
  schedule = npp.Schedule(stages, steps_per_epoch, s.model.grid)
  t = s.train
  total = schedule.total_steps if t.max_steps <= 0 else min(t.max_steps, schedule.total_steps)
  return Plan(s, schedule, meta, steps_per_epoch, total, _eval_split(s))


def _check_data(s: Settings, split: str, path: str):
  """The split's metadata (of the model's kind of data set), checked against the model."""
  meta = datasets.reader(s.model).load_metadata(path, split=split)
  model, what = (
    s.model,
    f"the data set {path}" if split == "train" else f"split {split!r} of {path}",
  )
  if tuple(meta.grid) != tuple(model.grid):
    raise ValueError(
      f"{what} holds {meta.grid[0]}x{meta.grid[1]} code grids; "
      f"expected model.grid={tuple(model.grid)}"
    )
  if meta.max_code >= model.vocab_size:
    raise ValueError(
      f"{what} holds code {meta.max_code}; expected codes < model.vocab_size={model.vocab_size}"
    )
  if model.condition != "text":
    if meta.max_label >= model.num_classes:
      raise ValueError(
        f"{what} holds label {meta.max_label}; expected labels "
        f"< model.num_classes={model.num_classes}"
      )
    return meta
  # Batches carry the caption padded to the data set's max_length: the model's condition positions.
  got = (meta.max_length, meta.caption_dim)
  if got != (model.cls_token_num, model.caption_dim):
    raise ValueError(
      f"{what} holds captions of {got[0]} x {got[1]} features; expected model.cls_token_num="
      f"{model.cls_token_num} x model.caption_dim={model.caption_dim}"
    )
  if meta.num_valid == 0:
    raise ValueError(f"{what} holds no valid example (no image was readable); expected some")
  return meta


def _eval_split(s: Settings) -> str | None:
  """The split to evaluate (data.eval_split, else "test" or "validation" if the data set has
  one)."""
  split = s.data.eval_split
  if not split:
    found = [n for n in ("test", "validation") if n in code_dataset.finished_splits(s.data.path)]
    split = found[0] if found else None
  if s.train.eval_batches == 0 or split is None:
    return None
  _check_data(s, split, s.data.path)
  return split


# ----------------------------------------------------------------------------------- model and step

# The state and the step live in npp_jax/train_step.py (a library: --mode=compile and the benchmarks
# compile them without importing this job); the names stay here for callers of `train.train_step`.
TrainState = step_lib.TrainState
BATCH_KEYS = step_lib.BATCH_KEYS
make_optimizer = step_lib.make_optimizer
init_state = step_lib.init_state
train_step = step_lib.train_step


# ---------------------------------------------------------------------------------------------- run


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


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  on_log: Callable[[int, Mapping[str, float]], None] | None = None,
) -> jobs.Result:
  """Train until the schedule (or train.max_steps) ends; re-running the same command resumes.

  Outputs: the last logged scalars and the last evaluations ("eval/nll", "eval/class_info", the
  sample metrics), with "step", "loop_s", "compile_s" and "train_s"; stopped_early when a SIGTERM
  stopped it after saving. on_log(step, scalars) is called after every log line (a console progress
  bar).
  """
  # From here on a SIGTERM asks for a save and a stop at the loop's next agreed step, however early
  # it comes (restoring, compiling): a process that died alone would leave the others in a
  # collective.
  with checkpoints.Preemption() as preempt:
    out = _train(config, workdir, preempt, on_log)
  return jobs.Result(stopped_early=out["step"] < out["total_steps"], outputs=out)


def _train(config, workdir, preempt, on_log) -> dict:
  # Every setting, the files and the data's facts: nothing is loaded, compiled or written before.
  p = check(config, workdir, jobs.Topology.current())
  ckpt_dir = epath.Path(workdir) / "checkpoints"
  ckpt, init_params = _open_checkpoints(config, ckpt_dir)
  mesh = sharding.make_mesh(config.mesh)
  metrics = p.settings.sample_metrics
  if metrics is not None:  # FID etc. of samples: its inputs loaded and checked before any compile.
    metrics = sample_metrics.create(metrics, config, p.model, workdir, mesh, p.total_steps)
  it = datasets.reader(p.model).make_train_iterator(
    config.data.path,
    global_batch_size=config.train.global_batch_size,
    seed=config.data.shuffle_seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
    worker_count=config.data.worker_count,
  )
  run = _build(config, p, mesh)
  if ckpt is None:
    ckpt = checkpoints.Checkpointer(
      ckpt_dir,
      keep=config.train.keep_checkpoints,
      architecture=checkpoints.architecture(config.model),
    )
  start = _resume(config, run, ckpt, init_params, it)
  steps = _CompiledSteps(config, run)
  evaluators = [e for e in (_heldout(config, p, run), metrics) if e is not None]
  writer, hooks = _writer(config, workdir, p.total_steps, start)
  summaries.write_parameter_overview(run.state.params, workdir, is_main=jax.process_index() == 0)
  logging.info(
    "Model %s: %.1fM parameters; schedule %s; %d steps/epoch, %d steps; token ratio %.3f, "
    "FLOP ratio %.3f vs next-token training.",
    config.model.name,
    gpt.count_params(p.model) / 1e6,
    [(s.k, s.epochs) for s in p.schedule.stages],
    p.steps_per_epoch,
    p.total_steps,
    p.schedule.token_ratio(),
    costs.schedule_flop_ratio(p.schedule, p.model),
  )
  t_loop = time.perf_counter()
  step, last = _loop(
    config, p, run, it, ckpt, steps, evaluators, writer, hooks, start, preempt, on_log
  )
  ckpt.close()
  writer.flush()
  wall, compile_s = time.perf_counter() - t_loop, steps.compile_s()
  return {
    "step": step,
    "total_steps": p.total_steps,
    **last,
    "loop_s": wall,
    "compile_s": compile_s,
    "train_s": wall - compile_s,
  }


def _heldout(config, p: Plan, run) -> heldout_nll.HeldOutNLL | None:
  """The held-out NLL evaluator: at the end of every NPP stage, at the last step, and every
  train.eval_every_steps; None without a held-out split."""
  if p.eval_split is None:
    return None
  t = config.train
  data = (config.data.path, p.eval_split, t.global_batch_size // t.grad_accum_steps, t.eval_batches)
  return heldout_nll.HeldOutNLL(
    run.model,
    run.mesh,
    run.state_sharding.params,
    data,
    at={s.end_step for s in p.schedule.stages} | {p.total_steps},
    every_steps=t.eval_every_steps,
  )


def _open_checkpoints(config, ckpt_dir: epath.Path):
  """(Checkpointer of an existing run or None, init_from parameters or None), checked before any
  compile."""
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


def _build(config, p: Plan, mesh) -> _Run:
  """Model, optimizer and a fresh state created already sharded on `mesh` (eval_shape, then jit)."""
  axis_rules = sharding.axis_rules(config.mesh)
  model = gpt.GPT(p.model)
  tx, lr_fn = make_optimizer(config, p.schedule)
  init_fn, rng = init_state(model, tx, p.model, config.seed, config.optim.ema_decay > 0)
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
  """One step per k, compiled ahead of time on first use and kept for the whole stage, so its cost
  and memory are logged apart from the steps."""

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
  """Metric writer (TensorBoard on process 0, logging elsewhere) and the progress / profile
  hooks."""
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
    "tokens_per_s": b * npp.num_patches(p.model.grid, k) / step_s,
    "relative_cost": costs.cumulative_relative_cost(p.schedule, p.model, step),
    "epoch": step / p.steps_per_epoch,
  }
  util = costs.mfu(costs.train_step_flops(p.model, k, b).total, step_s, jax.device_count(), peak)
  if util is not None:
    out["mfu"] = util
  return out


def _loop(
  config, p: Plan, run: _Run, it, ckpt, steps, evaluators, writer, hooks, start, preempt, on_log
):
  """Steps until the end of the schedule or a preemption; returns (last step, last logged
  scalars)."""
  peak = costs.peak_flops_per_device(override=config.train.peak_flops_per_device)
  t, step, last_eval = config.train, start, {}
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
      excluded_s=lambda: steps.compile_s() + sum(e.seconds for e in evaluators),
    )
    while step < p.total_steps:
      k = p.schedule.k_at(step)
      local = next(it)
      batch = {key: local[key] for key in BATCH_KEYS[p.model.condition]}
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
      for evaluator in evaluators:
        if evaluator.due(step):
          last_eval |= _evaluate(evaluator, run.state, p, step, writer)
  return step, {**lp.last, **last_eval}


def _evaluate(evaluator, state, p: Plan, step: int, writer) -> dict:
  """One evaluation (npp_jax.evaluators), written under eval/ beside the cost so far (quality
  against cost); returns its own scalars."""
  out = evaluator(state, step)
  writer.write_scalars(
    step,
    {
      **out,
      "eval/relative_cost": costs.cumulative_relative_cost(p.schedule, p.model, step),
      "eval/epoch": step / p.steps_per_epoch,
    },
  )
  logging.info("Step %d: %s.", step, ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
  return out


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
