"""--mode=compile: every program a run executes, compiled ahead of time for a TPU slice, anywhere.

  python -m npp_jax.main --mode=compile --config=configs/xl.py --workdir=W \
      --config.compile.topology=v5p:4x4x4

The run's mesh (config.mesh, -1 taking the devices left) is laid over the slice's devices
(libtpu's compile-only topology: no TPU needed), and each program is lowered from shapes alone
(jax.eval_shape: no array is allocated) with the real dtypes and shardings, then compiled by XLA
for that TPU: train_k{k} for every k of the schedule (train_step.py's train_step on its sharded
state), eval (the held-out step), sample_prefill and sample_decode (sampling.Sampler's programs at
sample.batch_size, weights sharded; left out, with a note, for a config without sampling) and
extract_encode (the VQ encoder at extract.batch_size).

Per program: bytes per device (arguments + outputs + temporaries - aliased, from XLA's memory
analysis) against the chip's HBM less compile.headroom, XLA's FLOPs and bytes accessed per device,
and an ESTIMATED time: the roofline max(FLOPs / peak bf16 FLOP/s, bytes / HBM bandwidth) of
npp_jax/chips.py, a lower bound that leaves out communication. A table on the console and
WORKDIR/compile.json, the only file written. A program that does not fit ends the run with one
`error:` line naming it and what would make it fit.
"""

import dataclasses
import functools
import math
import re
import time
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from npp_jax import chips
from npp_jax import files
from npp_jax import jobs
from npp_jax import npp
from npp_jax import preflight
from npp_jax import rules
from npp_jax import sampling
from npp_jax import sharding
from npp_jax import train_step as step_lib
from npp_jax.data import code_dataset
from npp_jax.evaluators import heldout_nll
from npp_jax.models import gpt
from npp_jax.models import vq

STEP_KEYS = (
  "step",
  "k",
  "bytes_per_device",
  "hbm_bytes_per_device",
  "fits",
  "flops",
  "bytes_accessed",
  "estimated_s",
)
SAMPLE_PROGRAMS = ("sample_prefill", "sample_decode")
SECTIONS = ("compile", "model", "npp", "optim", "train", "mesh", "sample", "extract")

# ----------------------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class CompileSettings:
  """The `compile` section: the slice, HBM kept free, which programs, images per epoch."""

  topology: str
  headroom: float = 0.1
  programs: tuple[str, ...] = ()
  num_examples: int = 1_281_167

  def __post_init__(self):
    rules.check("compile.topology", self.topology, rules.TEXT)
    rules.check("compile.headroom", self.headroom, rules.FRACTION)
    rules.check("compile.num_examples", self.num_examples, rules.POSITIVE_INT)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "CompileSettings":
    fields = ("topology", "headroom", "programs", "num_examples")
    values = {f: rules.get(config, f"compile.{f}") for f in fields}
    return cls(**{**values, "programs": tuple(values["programs"] or ())})


@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything decided before anything is compiled: slice, mesh, model and programs."""

  settings: CompileSettings
  slice: chips.Slice
  mesh_shape: tuple[int, ...]
  cfg: gpt.GPTConfig
  schedule: npp.Schedule
  steps_per_epoch: int
  programs: tuple[str, ...]

  @property
  def budget(self) -> int:
    """Bytes a program may take per device: the HBM less the headroom."""
    return int(self.slice.chip.hbm_bytes * (1.0 - self.settings.headroom))


def check(config: ml_collections.ConfigDict, workdir, topology=None) -> Plan:
  """The workdir (None: not checked, for a caller that writes nothing), then check_settings;
  nothing compiled or written. One-line ValueErrors."""
  if workdir is not None:
    preflight.check_workdir(workdir)  # compile.json is the only file this job writes.
  return check_settings(config, topology)


def check_settings(config: ml_collections.ConfigDict, topology=None) -> Plan:
  """The compile section, the mesh against the slice and the run's batches. `topology` (this
  machine's devices) is not used: the run's devices are the slice's."""
  del topology
  s = CompileSettings.from_config(config)
  if not s.topology:
    raise ValueError(
      "compile.topology is empty; expected a TPU slice such as 'v5e:2x2', 'v5e:16x16', "
      "'v5p:4x4x4' or 'v6e:8x8'"
    )
  tpu = chips.parse_slice(s.topology)
  if not chips.libtpu_available():
    raise ValueError(
      "--mode=compile needs libtpu, which is not installed here; expected `pip install libtpu` "
      "(wheels for Linux x86_64 only)"
    )
  try:
    shape = sharding.mesh_shape(config.mesh.shape, tpu.num_chips)
  except ValueError as e:  # Its message names this machine's platform; the devices are the slice's.
    raise ValueError(
      f"{str(e).split('; found')[0]}; {tpu.name} has {tpu.num_chips} chips"
    ) from None
  cfg = gpt.GPTConfig.from_config(config.model)
  t = config.train
  sharding.check_batch(
    t.global_batch_size,
    config.mesh,
    "train.global_batch_size",
    num_devices=tpu.num_chips,
    process_count=tpu.num_hosts,
    micro_batches=t.grad_accum_steps,
  )
  steps = code_dataset.steps_per_epoch(s.num_examples, t.global_batch_size)
  if steps < 1:
    raise ValueError(
      f"train.global_batch_size={t.global_batch_size} is larger than compile.num_examples="
      f"{s.num_examples}; expected at most one epoch per batch"
    )
  schedule = npp.Schedule.from_config(config, steps)
  o = config.optim
  schedule.learning_rate(o.lr, o.end_lr, o.warmup_epochs, o.decay_ratio)  # Validates the LR knobs.
  rules.expect(config, "extract.batch_size", rules.POSITIVE_INT)
  sample = () if sampling_note(config) else SAMPLE_PROGRAMS
  known = (*(f"train_k{k}" for k in _ks(schedule)), "eval", *sample, "extract_encode")
  for name in s.programs:
    if name not in known:
      raise ValueError(
        f"compile.programs names {name!r}; expected () for all, or some of {list(known)}"
      )
  programs = tuple(p for p in known if not s.programs or p in s.programs)
  return Plan(s, tpu, shape, cfg, schedule, steps, programs)


def _ks(schedule: npp.Schedule) -> tuple[int, ...]:
  return tuple(dict.fromkeys(stage.k for stage in schedule.stages))


# ----------------------------------------------------------------------------------------- programs


@dataclasses.dataclass(frozen=True)
class Program:
  name: str
  k: int | None
  lower: Callable[[], Any]  # () -> jax.stages.Lowered, lowered from shapes only.


def programs(config, plan: Plan, mesh) -> list[Program]:
  """The run's programs on `mesh`, each ready to lower from abstract arguments (no arrays)."""
  out = []
  want = set(plan.programs)
  if want & {*(f"train_k{k}" for k in _ks(plan.schedule)), "eval"}:
    out += _gpt_programs(config, plan, mesh, want)
  if want & set(SAMPLE_PROGRAMS):
    out += _sample_programs(config, mesh, want)
  if "extract_encode" in want:
    out.append(_extract_program(config, mesh))
  return out


def _gpt_programs(config, plan: Plan, mesh, want: set[str]) -> list[Program]:
  """train_k{k} (train_step.train_step, state donated, as the trainer compiles it) and eval."""
  model = gpt.GPT(plan.cfg)
  tx, lr_fn = step_lib.make_optimizer(config, plan.schedule)
  init_fn, rng = step_lib.init_state(model, tx, plan.cfg, config.seed, config.optim.ema_decay > 0)
  axis_rules = sharding.axis_rules(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
    boxed = jax.eval_shape(init_fn, rng)
    state_sharding = sharding.logical_shardings(boxed, mesh, axis_rules)
  state = _abstract(nn.unbox(boxed), state_sharding)
  batch_sharding = sharding.data_sharding(mesh)
  t = config.train
  micro = t.global_batch_size // t.grad_accum_steps

  def lower_in_mesh(jitted, *args):
    with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules):
      return jitted.lower(*args)

  out = []
  for k in _ks(plan.schedule):
    if f"train_k{k}" not in want:
      continue
    step = functools.partial(
      step_lib.train_step,
      model=model,
      tx=tx,
      lr_fn=lr_fn,
      k=k,
      accum=t.grad_accum_steps,
      ema_decay=float(config.optim.ema_decay),
    )
    jitted = jax.jit(
      step,
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, None),
      donate_argnums=0,
    )
    batch = _batch(plan.cfg, t.global_batch_size, batch_sharding)
    out.append(Program(f"train_k{k}", k, functools.partial(lower_in_mesh, jitted, state, batch)))
  if "eval" in want:
    # The trainer's Evaluator: k = 1 NLL of micro-batch-sized batches with their padding mask.
    step = functools.partial(heldout_nll.eval_step, model=model, num_classes=plan.cfg.num_classes)
    jitted = jax.jit(step, in_shardings=(state_sharding.params, batch_sharding))
    batch = {
      **_batch(plan.cfg, micro, batch_sharding),
      "mask": _array((micro,), jnp.bool_, batch_sharding),
    }
    out.append(Program("eval", 1, functools.partial(lower_in_mesh, jitted, state.params, batch)))
  return out


def _sample_programs(config, mesh, want: set[str]) -> list[Program]:
  """sample_prefill and sample_decode as sampling runs them on the run's mesh (sampling.Sampler:
  weights and KV cache sharded as training shards them) at sample.batch_size, guidance included
  when sample.cfg_scale > 1. Its one-line ValueErrors (batch vs mesh, top_k vs vocab) are raised
  here, before anything is compiled."""
  sampler = sampling.Sampler.from_config(config, mesh, platform="tpu")
  return [
    Program(name, None, functools.partial(jitted.lower, *args))
    for name, (jitted, args) in sampler.programs(config.sample.batch_size).items()
    if name in want
  ]


def sampling_note(config) -> str | None:
  """Why the sampler's programs are not compiled for this config, or None when they are."""
  if "sample" not in config:
    return "the config has no `sample` section (no sampling is set up for this model)"
  if config.model.get("condition", "class") != "class":
    # sampling.Sampler.programs builds class-label arguments; a caption prefill has none yet.
    return f"model.condition={config.model.condition!r}: the sampler's programs take class labels"
  return None


def _batch(cfg: gpt.GPTConfig, n: int, sharding_) -> dict:
  """A batch of n rows as the data sets give it (data/code_dataset.py, data/captions.py)."""
  h, w = cfg.grid
  batch = {"codes": _array((n, h, w), jnp.int32, sharding_)}
  if cfg.condition == "text":
    caption = (n, cfg.cls_token_num, cfg.caption_dim)
    batch["caption"] = _array(caption, jnp.bfloat16, sharding_)
    batch["caption_len"] = _array((n,), jnp.int32, sharding_)
    batch["valid"] = _array((n,), jnp.bool_, sharding_)
  else:
    batch["labels"] = _array((n,), jnp.int32, sharding_)
  return batch


def _extract_program(config, mesh) -> Program:
  """vq.encode_fn as extraction calls it: VQ weights replicated, one view of the batch split over
  data x fsdp, rows padded up to a multiple of that (jobs/extract.py `rows`)."""
  cfg = vq.VQConfig.from_config(config.vq)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = math.ceil(config.extract.batch_size / dp) * dp
  params = _abstract(vq.abstract_params(cfg), sharding.replicated(mesh))
  images = _array(
    (rows, cfg.image_size, cfg.image_size, 3), jnp.uint8, sharding.data_sharding(mesh)
  )
  return Program("extract_encode", None, lambda: vq.encode_fn.lower(params, images, cfg))


def _abstract(tree, shardings):
  """ShapeDtypeStructs of `tree` carrying `shardings` (one for all leaves, or a matching tree)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: _array(x.shape, x.dtype, shardings), tree)
  return jax.tree.map(lambda x, s: _array(x.shape, x.dtype, s), tree, shardings)


def _array(shape, dtype, sharding_) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


# ------------------------------------------------------------------------------------------ measure


@dataclasses.dataclass(frozen=True)
class Measured:
  """One program's row of compile.json (`row()`), plus what the refusal line needs."""

  step: str
  k: int | None
  bytes_per_device: int | None  # None: XLA refused the program without saying how much it needs.
  hbm_bytes_per_device: int
  fits: bool
  flops: float | None
  bytes_accessed: float | None
  estimated_s: float | None
  argument_bytes: int | None = None  # State and batch: what fsdp shards.
  temp_bytes: int | None = None  # Activations, gradients: what remat and smaller batches shrink.
  compile_s: float = 0.0

  def row(self) -> dict:
    return {key: getattr(self, key) for key in STEP_KEYS}


def measure(program: Program, plan: Plan) -> Measured:
  """Compile for the slice, read XLA's memory and cost analyses (an out-of-memory compile too)."""
  chip = plan.slice.chip
  t0 = time.perf_counter()
  try:
    compiled = program.lower().compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    logging.info("XLA refused %s on %s: %s", program.name, plan.slice.name, e)
    return Measured(
      program.name, program.k, _required_bytes(str(e)), chip.hbm_bytes, False, None, None, None
    )
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  total = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # A list in older jax releases.
  flops, accessed = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
  estimate = max(flops / chip.peak_flops, accessed / chip.hbm_bytes_per_s)
  logging.info(
    "Compiled %s for %s in %.1f s: %.2f GiB per device.",
    program.name,
    plan.slice.name,
    seconds,
    total / chips.GiB,
  )
  return Measured(
    program.name,
    program.k,
    int(total),
    chip.hbm_bytes,
    total <= plan.budget,
    flops,
    accessed,
    estimate,
    argument_bytes=int(mem.argument_size_in_bytes),
    temp_bytes=int(mem.temp_size_in_bytes),
    compile_s=seconds,
  )


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _required_bytes(message: str) -> int | None:
  """XLA's '... memory required ... (24.00G) exceeds available HBM (15.75G)' -> bytes needed."""
  m = re.search(r"requir\w*\D*?([\d.]+)\s*([KMGT])", message)
  return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None


# ---------------------------------------------------------------------------------------------- run


def run(config: ml_collections.ConfigDict, workdir) -> jobs.Result:
  """Compile every program of the plan for the slice; outputs: the report, also written to
  WORKDIR/compile.json.

  Raises ValueError (one line) naming the first program that does not fit, after compile.json is
  written.
  """
  plan = check(config, workdir)
  with chips.quiet_libtpu("JAX's backend start-up"):  # JAX tries libtpu's TPU backend first.
    jax.devices()
  devices = chips.load_topology(plan.slice)
  mesh = sharding.make_mesh(config.mesh, devices)
  rows = [measure(p, plan) for p in programs(config, plan, mesh)]
  report = {
    "topology": plan.slice.name,
    "mesh": dict(zip(config.mesh.axes, plan.mesh_shape)),
    "steps": [r.row() for r in rows],
  }
  note = sampling_note(config)
  if note:
    logging.info("sample_prefill and sample_decode are not compiled: %s.", note)
  print(table(plan, rows, note), flush=True)
  out = files.absolute(workdir)
  out.mkdir(parents=True, exist_ok=True)
  files.write_json(out / "compile.json", report)
  too_big = [r for r in rows if not r.fits]
  if too_big:
    raise ValueError(refusal(config, plan, too_big))
  return jobs.Result(outputs=report)


def _gib(n) -> str:
  return "?" if n is None else f"{n / chips.GiB:.2f}"


def table(plan: Plan, rows: list[Measured], sampling_skipped: str | None = None) -> str:
  """The console report: one line per program, every time labelled as a roofline estimate."""
  chip, s = plan.slice.chip, plan.slice
  head = (
    f"{s.name}: {s.num_chips} chips ({chip.device_kind}, {chip.hbm_bytes / chips.GiB:.0f} GiB HBM, "
    f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16, {chip.hbm_bytes_per_s / 1e9:.0f} GB/s), "
    f"{s.num_hosts} hosts; mesh "
    + " x ".join(f"{a}={n}" for a, n in zip(("data", "fsdp", "tensor"), plan.mesh_shape))
    + f"; fits = at most {_gib(plan.budget)} GiB ({1 - plan.settings.headroom:.0%} of HBM)"
  )
  lines = [
    head,
    f"{'program':<16}{'k':>3}{'GiB/device':>12}{'fits':>6}{'TFLOP/device':>14}"
    f"{'GB accessed':>13}{'ESTIMATED s':>13}",
  ]
  for r in rows:
    lines.append(
      f"{r.step:<16}{r.k if r.k is not None else '-':>3}{_gib(r.bytes_per_device):>12}"
      f"{'yes' if r.fits else 'NO':>6}"
      + (
        f"{r.flops / 1e12:>14.3f}{r.bytes_accessed / 1e9:>13.2f}{r.estimated_s:>13.4f}"
        if r.flops is not None
        else f"{'-':>14}{'-':>13}{'-':>13}"
      )
    )
  per_k = {r.k: r.estimated_s for r in rows if r.step.startswith("train_") and r.estimated_s}
  if per_k and all(stage.k in per_k for stage in plan.schedule.stages):
    hours = sum((st.end_step - st.start_step) * per_k[st.k] for st in plan.schedule.stages) / 3600
    lines.append(
      "ESTIMATED (roofline, no communication): the schedule "
      f"{[(st.k, st.epochs) for st in plan.schedule.stages]} at {plan.steps_per_epoch} "
      f"steps/epoch takes {hours:.1f} h"
    )
  decode = {r.step: r.estimated_s for r in rows if r.step.startswith("sample_")}
  if all(decode.get(p) for p in SAMPLE_PROGRAMS):
    tokens = plan.cfg.grid[0] * plan.cfg.grid[1]
    seconds = decode["sample_prefill"] + (tokens - 1) * decode["sample_decode"]
    lines.append(
      f"ESTIMATED (roofline): one sampling batch (prefill + {tokens - 1} decode steps) takes "
      f"{seconds:.2f} s"
    )
  if sampling_skipped:
    lines.append(f"sample_prefill, sample_decode: not compiled, {sampling_skipped}.")
  lines.append(
    "ESTIMATED s = max(FLOPs / peak, bytes / bandwidth) per device: a roofline estimate, not a "
    "measurement (docs/slices.md)."
  )
  return "\n".join(lines)


def refusal(config, plan: Plan, too_big: list[Measured]) -> str:
  """One line: the first program that does not fit, its bytes against the HBM, what would fit it."""
  r = too_big[0]
  need = f"{_gib(r.bytes_per_device)} GiB" if r.bytes_per_device else "more than the HBM"
  others = f" (also: {', '.join(x.step for x in too_big[1:])})" if too_big[1:] else ""
  return (
    f"{r.step} needs {need} per device on {plan.slice.name}, more than {_gib(plan.budget)} GiB "
    f"({1 - plan.settings.headroom:.0%} of the {_gib(r.hbm_bytes_per_device)} GiB HBM of a "
    f"{plan.slice.chip.device_kind} chip){others}; to fit: "
    + "; or ".join(_remedies(config, plan, r))
  )


def _remedies(config, plan: Plan, r: Measured) -> list[str]:
  """What would shrink this program: fsdp for the state, remat or fewer images per device."""
  d, f, t = plan.mesh_shape
  n = plan.slice.num_chips
  out = []
  if r.step == "extract_encode":
    dp = d * f
    smaller = max(dp, config.extract.batch_size // 2)
    return [f"fewer images per device (--config.extract.batch_size={smaller})"]
  if r.step.startswith("sample_"):
    if f < n // t:
      out.append(f"shard the weights over more devices (--config.mesh.shape='(1,{n // t},{t})')")
    b = config.sample.batch_size
    if b % (2 * d * f) == 0:
      out.append(f"fewer samples per device (--config.sample.batch_size={b // 2})")
    return out or [f"a slice with more chips than {n}, or a chip with more HBM"]
  if f < n // t:
    state = f" (arguments now {_gib(r.argument_bytes)} GiB)" if r.argument_bytes else ""
    out.append(f"shard the state over more devices (--config.mesh.shape='(1,{n // t},{t})'){state}")
  if r.step.startswith("train_") and config.model.remat != "full":
    temps = f" (temporaries now {_gib(r.temp_bytes)} GiB)" if r.temp_bytes else ""
    out.append(f"recompute activations (--config.model.remat=full){temps}")
  accum = config.train.grad_accum_steps
  if config.train.global_batch_size % (2 * accum * d * f) == 0:
    out.append(f"fewer images per device (--config.train.grad_accum_steps={2 * accum})")
  if not out:
    out.append(f"a slice with more chips than {n}, or a chip with more HBM")
  return out
