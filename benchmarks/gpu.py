"""Accelerator figures (issue 22): one JSON line per figure, timed after a warm-up, compile apart.

  python benchmarks/gpu.py                  # every figure on one GPU: <= 7 minutes on an H200
  python benchmarks/gpu.py --only=train,attention --steps=10
  python benchmarks/gpu.py --smoke          # tiny sizes, seconds on a CPU (tests/test_gpu_bench.py)

Figures (they run short ones first, training last; docs/performance.md, "GPU figures", says how
to run this on a lent GPU):
  train           GPT-B / L / XL, bf16 compute, fp32 weights and AdamW, global batch 256, k = 1, 2,
                  4, layers scanned, remat where needed to fit (the policy is in the line): s/step,
                  tokens/s (sequence positions), MFU against the chip's dense bf16 peak with the
                  FLOP count of npp_jax/costs.py, the program's memory (XLA's analysis), the peak.
  attention       jax.nn.dot_product_attention, causal, forward + backward at each training shape,
                  implementation "xla" and "cudnn": times, and each one's error against fp32 XLA.
  sample_serving  LlamaGen's serving measurement: GPT-B and GPT-XL, 24 x 24 grid, 8 class labels
                  with guidance 4.0 (16 sequences), top-k 2000, bf16 (GPT-B also fp32), GPT
                  only: seconds for the 8 images.
  sample_fid      GPT-B, 16 x 16, batch 256 with its guidance (2.0): images/s, projected 50,000.
  inception       The FID Inception (299 px, fp32) on 256 px uint8 images, batch 500: images/s.
  vq_encode       VQ-16 encoder + quantizer at 256 px, batch 256, fp32: images/s.
  vq_decode       VQ-16 decoder from 16 x 16 codes to 256 px, batch 64, fp32: images/s.

Every figure runs the project's own functions (jobs/train.py train_step, sampling.sample_codes,
fid/features.feature_fn, models/vq.encode_fn / decode_fn) on random weights and inputs; the values
do not change the time of these programs. A figure that fails prints a line with `error` and the
run goes on; the exit status is then 1. Times: median of --steps timed calls, min and max beside.
"""

import argparse
import dataclasses
import datetime
import functools
import json
import os
import statistics
import sys
import time
import traceback

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import evaluate as evaluate_bench  # noqa: E402  (benchmarks/evaluate.py: random Inception weights)
import machine  # noqa: E402  (benchmarks/, this script's folder, is on sys.path)

from npp_jax import config_lib  # noqa: E402
from npp_jax import costs  # noqa: E402
from npp_jax import npp  # noqa: E402
from npp_jax import sampling  # noqa: E402
from npp_jax import sharding  # noqa: E402
from npp_jax.fid import features  # noqa: E402
from npp_jax.jobs import train  # noqa: E402
from npp_jax.models import gpt  # noqa: E402
from npp_jax.models import vq  # noqa: E402

# In run order: short figures first, training (nine compiles, up to GPT-XL) last, so that a run
# cut off at its time limit loses the tail of training, not the rest.
FIGURES = (
  "sample_serving",
  "sample_fid",
  "inception",
  "vq_encode",
  "vq_decode",
  "attention",
  "train",
)
REMAT_ORDER = (
  "none",
  "dots",
  "full",
)  # Least recompute first; the next one when a program does not fit.
FLOP_MODEL = (
  "costs.train_step_flops: 3 x forward; forward = 2 x batch x positions x dense weights per "
  "layer x layers + 4 x batch x positions^2 x dim x layers (attention, causal half not "
  "discounted) + 2 x batch x positions x dim x vocab (logits)"
)


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Everything that differs between the real run and the smoke run."""

  dtype: (
    str  # Compute dtype of training and sampling (bf16 is the figure; fp32 compiles faster on CPU).
  )
  train_models: tuple[str, ...]
  remat: dict  # Model name -> first remat policy tried (estimated activations; see FULL's comment).
  batch: int
  ks: tuple[int, ...]
  attention_ks: tuple[int, ...]
  serving: tuple[tuple[str, str], ...]  # (model, dtype) runs of the serving figure.
  serving_grid: int
  serving_images: int
  serving_top_k: int
  fid_grid: int
  fid_batch: int
  inception_batch: int
  inception_px: int  # Input side; the network always resizes to inception_size.
  inception_size: int
  vq_config: str  # "vq16" (config_lib.vq_config) or a config file whose `vq` is used.
  vq_encode_batch: int
  vq_decode_batch: int


# Activations saved for the backward pass at batch 256 x 257 positions, bf16, no remat (~50-80 kB
# per position and layer, by hand): GPT-B ~36 GB, GPT-L ~95 GB, GPT-XL ~190 GB; with "dots"
# (matmul outputs only) GPT-XL ~65 GB. So B starts without remat, L and XL at "dots"; a program
# that XLA plans larger than the device goes to the next policy (REMAT_ORDER) before it runs.
FULL = Sizes(
  dtype="bfloat16",
  train_models=("GPT-B", "GPT-L", "GPT-XL"),
  remat={"GPT-B": "none", "GPT-L": "dots", "GPT-XL": "dots"},
  batch=256,
  ks=(1, 2, 4),
  attention_ks=(1, 2, 4),
  # GPT-B in fp32 too: the GPU default of sample.dtype follows the faster of the two.
  serving=(("GPT-B", "bfloat16"), ("GPT-B", "float32"), ("GPT-XL", "bfloat16")),
  serving_grid=24,
  serving_images=8,
  serving_top_k=2000,
  fid_grid=16,
  fid_batch=256,
  inception_batch=500,
  inception_px=256,
  inception_size=299,
  vq_config="vq16",
  vq_encode_batch=256,
  vq_decode_batch=64,
)
# Each program compiles in a few CPU seconds even when tiny, so the smoke run compiles as few as
# cover every path: two k (the remat policy carried from one k to the next), one attention shape.
SMOKE = Sizes(
  dtype="float32",
  train_models=("tiny",),
  remat={"tiny": "none"},
  batch=4,
  ks=(1, 2),
  attention_ks=(1,),
  serving=(("tiny", "float32"),),
  serving_grid=4,
  serving_images=2,
  serving_top_k=16,
  fid_grid=4,
  fid_batch=4,
  inception_batch=2,
  inception_px=32,
  inception_size=75,  # Inception-v3's smallest input.
  vq_config="configs/demo.py",
  vq_encode_batch=2,
  vq_decode_batch=2,
)
GUIDANCE = {
  "serving": 4.0,
  "fid": 2.0,
}  # LlamaGen's serving setting; GPT-B's best FID scale (NPP.md).


# -------------------------------------------------------------------------------------------------
# Common pieces: the line, timing, memory.


def common_fields(figure: str, smoke: bool) -> dict:
  return {
    "figure": figure,
    "device": machine.describe(),
    "device_kind": jax.devices()[0].device_kind,
    "jax_version": jax.__version__,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "smoke": smoke,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def emit(line: dict) -> None:
  print(
    json.dumps(line), flush=True
  )  # Flushed: a run cut off by its time limit keeps what it printed.


def spread(times: list[float]) -> dict:
  return {
    "s": round(statistics.median(times), 5),
    "s_min": round(min(times), 5),
    "s_max": round(max(times), 5),
    "timed_calls": len(times),
  }


def time_calls(fn, steps: int) -> list[float]:
  """fn() once to warm up, then `steps` timed calls, each waited for."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def compile_timed(jitted, *args, **kwargs):
  t0 = time.perf_counter()
  compiled = jitted.lower(*args, **kwargs).compile()
  return compiled, round(time.perf_counter() - t0, 2)


def gib(n) -> float | None:
  return None if n is None else round(n / 2**30, 3)


def program_bytes(compiled) -> int | None:
  """Device memory XLA plans for one call: arguments + outputs + temporaries, donated ones once."""
  m = compiled.memory_analysis()
  if m is None:
    return None
  return (
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  )


def device_limit() -> int | None:
  return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def process_peak() -> float | None:
  """Peak GiB in use on the device since the process began (monotone over the run; None on CPU)."""
  return gib((jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use"))


def is_oom(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


# -------------------------------------------------------------------------------------------------
# Models.


def model_config(name: str, grid: int):
  """The model section for a named size, or the smoke run's tiny model ("tiny")."""
  if name == "tiny":
    m = config_lib.model_config("custom")
    m.n_layer, m.n_head, m.dim = 1, 2, 64
    m.vocab_size, m.num_classes, m.multiple_of = 256, 10, 32
  else:
    m = config_lib.model_config(name)
  m.grid = (grid, grid)
  return m


def sampling_params(cfg: gpt.GPTConfig):
  """Random weights in the compute dtype; the output layer non-zero, so logits are not uniform."""
  model = gpt.GPT(cfg)
  h, w = cfg.grid

  def init():
    tokens, labels = jnp.zeros((1, h, w), jnp.int32), jnp.zeros((1,), jnp.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens, labels)["params"])
    out = params["output"]["kernel"]
    params["output"]["kernel"] = 0.02 * jax.random.normal(jax.random.key(1), out.shape, out.dtype)
    return jax.tree.map(lambda x: x.astype(cfg.dtype), params)

  return jax.jit(init)()


# -------------------------------------------------------------------------------------------------
# Figures. Each yields its lines (dicts without the common fields).


def train_figures(sizes: Sizes, args):
  for name in sizes.train_models:
    config = config_lib.base_config()
    config.model = model_config(name, 8 if name == "tiny" else 16)
    config.model.dtype = sizes.dtype
    config.model.scan_layers = args.scan_layers
    cfg = gpt.GPTConfig.from_config(config.model)
    schedule = npp.Schedule.from_config(config, steps_per_epoch=100)
    tx, lr_fn = train.make_optimizer(config, schedule)
    init_fn, rng = train.init_state(gpt.GPT(cfg), tx, cfg, 0, ema=False)
    state = jax.jit(lambda r: nn.unbox(init_fn(r)))(rng)  # noqa: B023  (called at once)
    h, w = cfg.grid
    rs = np.random.default_rng(0)
    batch = {
      "codes": jnp.asarray(rs.integers(0, cfg.vocab_size, (sizes.batch, h, w)), jnp.int32),
      "labels": jnp.asarray(rs.integers(0, cfg.num_classes, (sizes.batch,)), jnp.int32),
    }
    remat = args.remat or sizes.remat[name]
    for k in sizes.ks:
      line, state, remat = train_one(config, cfg, state, batch, k, remat, tx, lr_fn, args.steps)
      line.update(model=name, params_m=round(gpt.count_params(cfg) / 1e6, 1))
      yield line
    del state


def train_one(config, cfg, state, batch, k, remat, tx, lr_fn, steps):
  """One (model, k) figure; tries remat policies from `remat` on until the step fits the device.
  Returns (line, state, the policy that fitted) so the next k starts from that policy."""
  limit = device_limit()
  skipped = []
  for policy in REMAT_ORDER[REMAT_ORDER.index(remat) :]:
    cfg_p = dataclasses.replace(cfg, remat=policy)
    step = jax.jit(
      functools.partial(train.train_step, model=gpt.GPT(cfg_p), tx=tx, lr_fn=lr_fn, k=k, accum=1),
      donate_argnums=0,
    )
    try:
      compiled, compile_s = compile_timed(step, state, batch)
    except Exception as e:  # pylint: disable=broad-except
      if not is_oom(e):
        raise
      skipped.append(f"{policy}: out of memory when compiled")
      continue
    need = program_bytes(compiled)
    if limit and need and need > limit:
      skipped.append(f"{policy}: plans {gib(need)} GiB > {gib(limit)} GiB")
      continue
    holder = {"state": state}

    def call():
      holder["state"], m = compiled(holder["state"], batch)
      return m

    try:
      times = time_calls(call, steps)
    except Exception as e:  # pylint: disable=broad-except
      if not is_oom(e):
        raise
      skipped.append(f"{policy}: out of memory when run")
      state = holder["state"]
      continue
    state = holder["state"]
    s = statistics.median(times)
    positions = npp.num_patches(cfg.grid, k)
    flops = costs.train_step_flops(cfg, k, batch["codes"].shape[0])
    peak = costs.peak_flops_per_device()
    util = costs.mfu(flops.total, s, 1, peak)
    line = {
      "k": k,
      "batch": int(batch["codes"].shape[0]),
      "grid": list(cfg.grid),
      "positions": positions,
      "dtype": f"{jnp.dtype(cfg.dtype).name} compute, float32 params and AdamW",
      "remat": policy,
      "remat_skipped": skipped,
      "scan_layers": cfg.scan_layers,
      **spread(times),
      "tokens_per_s": round(batch["codes"].shape[0] * positions / s, 1),
      "images_per_s": round(batch["codes"].shape[0] / s, 3),
      "tflop_per_step": round(flops.total / 1e12, 4),
      "flop_split_tflop": {
        "dense": round(flops.transformer / 1e12, 4),
        "attention": round(flops.attention / 1e12, 4),
        "logits": round(flops.logits / 1e12, 4),
      },
      "flop_model": FLOP_MODEL,
      "peak_tflops": None if peak is None else peak / 1e12,
      "mfu": None if util is None else round(util, 4),
      "compile_s": compile_s,
      "program_gib": gib(need),
      "device_limit_gib": gib(limit),
      "process_peak_gib": process_peak(),
      "loss": float(jax.device_get(call()["loss"])),  # One more step: the value shows it trained.
    }
    return line, holder["state"], policy
  raise RuntimeError(f"k={k}: no remat policy fits the device ({'; '.join(skipped)})")


def attention_figures(sizes: Sizes, args):
  """Causal attention forward + backward at each training shape, both implementations; errors are
  max |x - ref| / max |ref| over the output and the three input gradients, ref = XLA in fp32."""
  on_gpu = jax.devices()[0].platform == "gpu"
  for name in sizes.train_models:
    cfg = gpt.GPTConfig.from_config(model_config(name, 8 if name == "tiny" else 16))
    for k in sizes.attention_ks:
      s = npp.num_patches(cfg.grid, k)
      shape = (sizes.batch, s, cfg.n_head, cfg.head_dim)
      keys = jax.random.split(jax.random.key(k), 4)
      q, kk, v, ct = (jax.random.normal(r, shape, jnp.float32) for r in keys)
      with jax.default_matmul_precision("highest"):  # A true fp32 reference: no TF32 on GPUs.
        ref = jax.jit(_fwd_bwd("xla"))(q, kk, v, ct)
      low = [x.astype(jnp.bfloat16) for x in (q, kk, v, ct)]
      line = {"model": name, "k": k, "shape_bshd": list(shape), "dtype": "bfloat16", "causal": True}
      results = {}
      for impl in ("xla", "cudnn"):
        if impl == "cudnn" and not on_gpu:
          line["cudnn_error"] = "cuDNN attention needs an NVIDIA GPU"
          continue
        try:
          compiled, compile_s = compile_timed(jax.jit(_fwd_bwd(impl)), *low)
          times = time_calls(lambda c=compiled: c(*low), args.steps)
          out = compiled(*low)
        except Exception as e:  # pylint: disable=broad-except  (cuDNN refuses some shapes)
          line[f"{impl}_error"] = str(e).splitlines()[0][:300]
          continue
        results[impl] = out
        line[f"{impl}_ms"] = round(1e3 * statistics.median(times), 4)
        line[f"{impl}_compile_s"] = compile_s
        line[f"{impl}_rel_err"] = _rel_err(out, ref)
      if "xla" in results and "cudnn" in results:
        line["cudnn_vs_xla_rel_err"] = _rel_err(results["cudnn"], results["xla"])
        # Agreeing means cuDNN is as close to fp32 as XLA's own bf16 is (or within bf16's 1e-2).
        line["agree"] = line["cudnn_rel_err"] <= max(2 * line["xla_rel_err"], 1e-2)
        faster = "cudnn" if line["cudnn_ms"] < line["xla_ms"] else "xla"
        line["faster"] = faster if line["agree"] else "xla"
      else:
        line["agree"] = None
        line["faster"] = "xla" if "xla" in results else None
      yield line


def _fwd_bwd(impl: str):
  def f(q, k, v, ct):
    attend = functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation=impl)
    o, pull = jax.vjp(attend, q, k, v)
    return (o, *pull(ct))

  return f


def _rel_err(xs, refs) -> float:
  errs = [
    float(jnp.max(jnp.abs(x.astype(jnp.float32) - r.astype(jnp.float32))))
    / max(float(jnp.max(jnp.abs(r.astype(jnp.float32)))), 1e-30)
    for x, r in zip(xs, refs)
  ]
  return round(max(errs), 6)


def _sampler_run(dtype_name: str, name, grid, n_images, cfg_scale, top_k, steps):
  """Seconds for n_images from sampling.sample_codes, weights and compute in `dtype_name`:
  (line fields, median seconds)."""
  dtype = gpt.DTYPES[dtype_name]
  cfg = dataclasses.replace(
    gpt.GPTConfig.from_config(model_config(name, grid)), dtype=dtype, param_dtype=dtype
  )
  params = sampling_params(cfg)
  labels = jnp.arange(n_images, dtype=jnp.int32) % cfg.num_classes
  settings = sampling.SamplingSettings(cfg_scale=cfg_scale, top_k=top_k)
  seeds = iter(range(1, 10_000))

  def call():
    key = jax.random.key(next(seeds))
    return sampling.sample_codes(params, labels, key, model=cfg, settings=settings)

  t0 = time.perf_counter()
  codes = jax.block_until_ready(call())
  first = time.perf_counter() - t0
  times = time_calls(call, steps)
  s = statistics.median(times)
  fields = {
    "model": name,
    "grid": [grid, grid],
    "images": n_images,
    "sequences": 2 * n_images if cfg_scale > 1 else n_images,
    "cfg_scale": cfg_scale,
    "top_k": top_k,
    "dtype": f"{dtype_name} weights and compute",
    **spread(times),
    "compile_s": round(max(first - s, 0.0), 2),
    "distinct_codes": int(len(np.unique(np.asarray(codes)))),
    "process_peak_gib": process_peak(),
  }
  return fields, s


def serving_figures(sizes: Sizes, args):
  for name, dtype_name in sizes.serving:
    fields, _ = _sampler_run(
      dtype_name,
      name,
      sizes.serving_grid,
      sizes.serving_images,
      GUIDANCE["serving"],
      sizes.serving_top_k,
      args.steps,
    )
    yield {**fields, "what": "GPT only: the class prompt to the last code, no VQ decode"}


def fid_figures(sizes: Sizes, args):
  name = sizes.serving[0][0]
  fields, s = _sampler_run(
    sizes.dtype, name, sizes.fid_grid, sizes.fid_batch, GUIDANCE["fid"], 0, args.steps
  )
  ips = sizes.fid_batch / s
  yield {
    **fields,
    "images_per_s": round(ips, 3),
    "projected_50k_s": round(50_000 / ips, 1),
    "what": "GPT only, one batch per call; add vq_decode and inception for the whole FID run",
  }


def inception_figures(sizes: Sizes, args):
  config = config_lib.base_config()
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  fn = features.feature_fn(mesh, "adm", sizes.inception_size)
  params = sharding.put(evaluate_bench.random_params(), sharding.replicated(mesh))
  n, px = sizes.inception_batch, sizes.inception_px
  images = np.random.default_rng(0).integers(0, 256, (n, px, px, 3), dtype=np.uint8)
  images = sharding.put(images, sharding.data_sharding(mesh))
  compiled, compile_s = compile_timed(fn, params, images)
  times = time_calls(lambda: compiled(params, images), args.steps)
  yield {
    "batch": n,
    "input_px": px,
    "network_px": sizes.inception_size,
    "dtype": "float32",
    "outputs": "pool3 and spatial (fid/features.feature_fn)",
    **spread(times),
    "images_per_s": round(n / statistics.median(times), 3),
    "compile_s": compile_s,
    "program_gib": gib(program_bytes(compiled)),
    "process_peak_gib": process_peak(),
  }


def _vq_cfg(sizes: Sizes) -> vq.VQConfig:
  if sizes.vq_config == "vq16":
    return vq.VQConfig.from_config(config_lib.vq_config())
  return vq.VQConfig.from_config(config_lib.load(sizes.vq_config).vq)


def vq_figures(sizes: Sizes, args, mode: str):
  cfg = _vq_cfg(sizes)
  params = jax.jit(vq.init_params, static_argnums=0)(cfg, jax.random.key(0))
  rs = np.random.default_rng(0)
  px, (h, w) = cfg.image_size, cfg.grid
  if mode == "encode":
    n = sizes.vq_encode_batch
    x = jnp.asarray(rs.integers(0, 256, (n, px, px, 3), dtype=np.uint8))
    fn = vq.encode_fn
  else:
    n = sizes.vq_decode_batch
    x = jnp.asarray(rs.integers(0, cfg.codebook_size, (n, h, w)), jnp.int32)
    fn = vq.decode_fn
  compiled, compile_s = compile_timed(fn, params, x, cfg=cfg)
  times = time_calls(lambda: compiled(params, x), args.steps)
  yield {
    "batch": n,
    "image_px": px,
    "grid": [h, w],
    "dtype": jnp.dtype(cfg.dtype).name,
    **spread(times),
    "images_per_s": round(n / statistics.median(times), 3),
    "compile_s": compile_s,
    "program_gib": gib(program_bytes(compiled)),
    "process_peak_gib": process_peak(),
  }


RUNNERS = {
  "train": train_figures,
  "attention": attention_figures,
  "sample_serving": serving_figures,
  "sample_fid": fid_figures,
  "inception": inception_figures,
  "vq_encode": functools.partial(vq_figures, mode="encode"),
  "vq_decode": functools.partial(vq_figures, mode="decode"),
}


# -------------------------------------------------------------------------------------------------


def parse(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  ap.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, any device")
  ap.add_argument("--only", default=",".join(FIGURES), help=f"comma-separated of {FIGURES}")
  ap.add_argument("--steps", type=int, default=5, help="timed calls per figure, after one warm-up")
  ap.add_argument(
    "--remat",
    choices=REMAT_ORDER,
    default=None,
    help="first remat policy tried (default per model)",
  )
  ap.add_argument(
    "--scan_layers",
    type=int,
    choices=(0, 1),
    default=1,
    help="train with the layers scanned (1, fast compiles) or unrolled (0)",
  )
  args = ap.parse_args(argv)
  only = tuple(f for f in args.only.split(",") if f)
  bad = [f for f in only if f not in FIGURES]
  if bad or not only:
    ap.error(f"--only={args.only!r}; expected a comma-separated subset of {', '.join(FIGURES)}")
  if args.steps < 1:
    ap.error(f"--steps={args.steps}; expected a positive integer")
  args.only, args.scan_layers = only, bool(args.scan_layers)
  return args


def main(argv=None) -> int:
  args = parse(argv)
  sizes = SMOKE if args.smoke else FULL
  failed = 0
  for figure in args.only:
    try:
      for line in RUNNERS[figure](sizes, args):
        emit({**common_fields(figure, args.smoke), **line})
    except Exception as e:  # pylint: disable=broad-except
      failed += 1  # One broken figure must not lose the rest.
      traceback.print_exc(file=sys.stderr)
      emit({**common_fields(figure, args.smoke), "error": str(e).splitlines()[0][:500]})
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
