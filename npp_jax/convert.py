"""PyTorch <-> JAX weights for the released GPT and VQ tokenizer checkpoints.

  python -m npp_jax.convert --kind=gpt --src=c2i_B_256.pt --config=configs/b.py --dst=/ckpt/gpt_b
  python -m npp_jax.convert --kind=vq --src=vq_ds16_c2i.pt --config=configs/b.py --dst=/ckpt/vq16
  python -m npp_jax.convert --kind=gpt --src=/ckpt/gpt_b --config=configs/b.py --dst=out.pt
  --to=torch
  python -m npp_jax.convert --kind=gpt --src=work/b --config=configs/b.py --dst=b.pt --to=torch
  python -m npp_jax.convert --kind=gpt --src=work/b --config=configs/b.py --dst=/ckpt/b --to=params
  python -m npp_jax.convert --kind=gpt --src=t2i_XL_stage1_256.pt --config=configs/t2i.py:XL --dst=D
  python -m npp_jax.convert --kind=vq --src=vq_ds16_t2i.pt --config=configs/t2i.py:XL --dst=D

`--to=torch` reads a params directory or a training workdir (WORKDIR, WORKDIR/checkpoints; for the
VQ, WORKDIR of --mode=train_vq or its vq_checkpoints/): the latest step, `--step=N` for another,
`--ema` for the EMA weights when the run kept them. `--to=params` writes a training workdir's
weights as a params directory, what sampling, extraction and `--to=torch` read.

The GPT architecture comes from `config.model`, the tokenizer's from `config.vq`. A text model
(model.condition="text", LlamaGen's t2i) has `cls_embedding.cap_proj.fc1/fc2.weight` and the null
caption buffer `cls_embedding.uncond_embedding` where a class model has its class table; the t2i
VQ is a VQ-16 like the class one.

Layout of a converted checkpoint: a directory written by orbax's StandardCheckpointer holding the
pytree `{"params": params}`, where `params` is the Linen "params" collection of
`npp_jax.models.gpt.GPT` (always the unscanned layout: `layers_0 .. layers_{n-1}`;
`gpt.stack_layers` gives the scanned one) or of `npp_jax.models.vq.VQModel`, in the config's
param_dtype: a params directory of npp_jax.checkpoints (`checkpoints.read_params(dir)` reads it
back). This module knows PyTorch; the project's own format is npp_jax.checkpoints'.

Reading accepts every form the releases use: a dict whose "model", "module" or "state_dict" entry is
the state dict, a bare state dict (FSDP exports), and with --ema the "ema" entry. `--to=torch`
writes `{"model": state_dict}`, which the PyTorch release loads with strict key matching.

torch is imported only inside the functions that need it (`pip install .[torch]`).
"""

import re
import sys
from typing import Any, Sequence

from absl import flags
from etils import epath
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from npp_jax import checkpoints
from npp_jax import cli
from npp_jax import files
from npp_jax import preflight
from npp_jax.models import gpt
from npp_jax.models import inception
from npp_jax.models import vq

KINDS = ("gpt", "vq")
DIRECTIONS = ("jax", "torch", "params")  # --to: a .pt to JAX, JAX to a .pt, a workdir to params.
# Torch keys that name the same tensor in both frameworks only after a special rename.
_SPECIAL_NAMES = {
  "cls_embedding/embedding": "cls_embedding.embedding_table.weight",
  "cls_embedding/uncond_embedding": "cls_embedding.uncond_embedding",  # A buffer: no ".weight".
  "quantize/embedding": "quantize.embedding.weight",
}
# Buffers that are no weights: usage statistics and inference caches the release may have saved.
_IGNORED = re.compile(r"(^|.*\.)(codebook_used|k_cache|v_cache|freqs_cis|causal_mask)$")
# Size of the release's `quantize.codebook_used` buffer; its strict loader wants the key present.
CODEBOOK_USED_SIZE = 65536
# Wrappers that prefix every key: DDP ("module.") and torch.compile ("_orig_mod.").
_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------------------
# Names and layouts.


def torch_name(path: str) -> str:
  """Flax path "layers_3/attention/wqkv/kernel" -> torch key "layers.3.attention.wqkv.weight"."""
  if path in _SPECIAL_NAMES:
    return _SPECIAL_NAMES[path]
  *modules, leaf = path.split("/")
  parts = [re.sub(r"^(.+)_(\d+)$", r"\1.\2", m) for m in modules]
  parts.append(
    "bias" if leaf == "bias" else "weight"
  )  # kernel, scale and embedding are all "weight".
  return ".".join(parts)


def to_flax(path: str, x: np.ndarray) -> np.ndarray:
  """A torch tensor (as numpy) in the Flax layout of `path`."""
  if x.ndim == 4:  # Conv2d [out, in, kh, kw] -> [kh, kw, in, out].
    return np.transpose(x, (2, 3, 1, 0))
  if x.ndim == 2 and path.endswith("kernel"):  # Linear [out, in] -> Dense [in, out].
    return x.T
  return x


def to_torch(path: str, x: np.ndarray) -> np.ndarray:
  if x.ndim == 4:
    return np.transpose(x, (3, 2, 0, 1))
  if x.ndim == 2 and path.endswith("kernel"):
    return x.T
  return x


def _torch_shape(path: str, shape: Sequence[int]) -> tuple[int, ...]:
  return to_torch(path, np.empty(shape, np.uint8)).shape


def expected_shapes(kind: str, config) -> dict[str, tuple[int, ...]]:
  """{flax path: shape} of the unscanned params of `kind` for a full config (config.model /
  config.vq)."""
  if kind == "gpt":
    return gpt.param_shapes(config.model)
  if kind == "vq":
    if "vq" not in config:
      raise ValueError("the config has no `vq` field; expected config.vq = config_lib.vq_config()")
    return vq.param_shapes(config.vq)
  raise ValueError(f"kind={kind!r}; expected one of {KINDS}")


def _param_dtype(kind: str, config):
  if kind == "gpt":
    return gpt.GPTConfig.from_config(config.model).param_dtype
  return vq.VQConfig.from_config(config.vq).param_dtype


def _mismatch_error(what: str, missing: list[str], unexpected: list[str], misshaped: list[str]):
  def show(items):
    items = sorted(items)
    return ", ".join(items[:8]) + (f", ... (+{len(items) - 8} more)" if len(items) > 8 else "")

  parts = []
  if missing:
    parts.append(f"missing {len(missing)} keys: {show(missing)}")
  if unexpected:
    parts.append(f"unexpected {len(unexpected)} keys: {show(unexpected)}")
  if misshaped:
    parts.append(f"{len(misshaped)} mis-shaped: {show(misshaped)}")
  return ValueError(f"{what} does not match the config; " + "; ".join(parts))


def _flatten(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(p, "key", p)) for p in path): x for path, x in flat}


# --------------------------------------------------------------------------------------------------
# Torch state dicts <-> params.


def load_torch_state(src: str, ema: bool = False) -> dict[str, np.ndarray]:
  """The state dict of a released checkpoint file as fp32 numpy arrays, wrapper prefixes removed."""
  import argparse
  import pickle

  import torch

  path = epath.Path(src)
  if not path.is_file():
    raise ValueError(f"--src={src!r} is not a file; expected a PyTorch checkpoint (.pt)")
  try:
    # Training scripts store their argparse.Namespace next to the weights; it holds only plain
    # values.
    with torch.serialization.safe_globals([argparse.Namespace]), path.open("rb") as f:
      obj = torch.load(f, map_location="cpu", weights_only=True)
  except (
    Exception
  ) as e:  # torch.load fails on a bad file with many types; each means "not loadable".
    raise ValueError(_unloadable(src, e, pickle.UnpicklingError)) from None
  if not isinstance(obj, dict):
    raise ValueError(
      f"{src} holds a {type(obj).__name__}; expected a dict (a state dict or a checkpoint)"
    )
  if ema:
    if not isinstance(obj.get("ema"), dict):
      raise ValueError(
        f"--ema: {src} has no 'ema' state dict; its top-level keys are {sorted(obj)[:10]}"
      )
    state = obj["ema"]
  else:
    wrapped = [k for k in ("model", "module", "state_dict") if isinstance(obj.get(k), dict)]
    if wrapped:
      state = obj[wrapped[0]]
    elif obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
      state = obj  # A bare state dict, as FSDP exports write.
    else:
      raise ValueError(
        f"{src} has no 'model', 'module' or 'state_dict' entry and is not a bare state "
        f"dict; its top-level keys are {sorted(map(str, obj))[:10]}"
      )
  out = {}
  for key, value in state.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f"{src}: entry {key!r} is a {type(value).__name__}; expected a tensor")
    for prefix in _PREFIXES:
      while key.startswith(prefix):
        key = key[len(prefix) :]
    out[key] = value.detach().to(torch.float32).cpu().numpy()
  return out


def _unloadable(src: str, e: Exception, unpickling_error: type) -> str:
  """What a file torch.load(weights_only=True) could not read is, in one line."""
  with epath.Path(src).open("rb") as f:
    head = f.read(4096)
  text = str(e)
  if isinstance(e, unpickling_error) and "truncated" not in text:
    called = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    what = (
      f"a pickle that calls {called.group(1)}"
      if called
      else "a pickle of more than tensors and plain values"
    )
    return (
      f"--src={src!r} holds {what}: refused, nothing in it was run (torch.load(weights_only=True) "
      "loads tensors and plain values only); expected a checkpoint written by torch.save"
    )
  if head.startswith(b"PK") or isinstance(e, EOFError) or "truncated" in text:
    return (
      f"--src={src!r} is a truncated or corrupt PyTorch file ({epath.Path(src).stat().length} "
      "bytes; "
      f"{type(e).__name__}); expected a complete checkpoint: copy it again"
    )
  if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
    return (
      f"--src={src!r} is a text file, not a PyTorch checkpoint; expected a file written by "
      "torch.save"
    )
  return (
    f"--src={src!r} is not a PyTorch checkpoint ({type(e).__name__}); expected a file written by "
    "torch.save"
  )


# A key only one condition's GPT has: which model.condition a state dict was saved from.
_CONDITION_KEYS = {
  "class": "cls_embedding.embedding_table.weight",
  "text": "cls_embedding.cap_proj.fc1.weight",
}


def _check_condition(kind: str, keys, config, what: str) -> None:
  """A class checkpoint for a text config (or the reverse): one line that says so."""
  if kind != "gpt":
    return
  want = config.model.condition
  for other, key in _CONDITION_KEYS.items():
    if other != want and key in keys and _CONDITION_KEYS.get(want) not in keys:
      raise ValueError(
        f"{what} holds a {other}-conditioned GPT ({key}); expected a {want}-conditioned one as "
        f"model.condition={want!r} says (use the config of the checkpoint's model)"
      )


def state_to_params(kind: str, state: dict[str, np.ndarray], config, what: str = "the checkpoint"):
  """Torch state dict (numpy) -> nested Flax params; every key and shape checked against the
  config."""
  _check_condition(kind, state, config, what)
  shapes = expected_shapes(kind, config)
  dtype = _param_dtype(kind, config)
  names = {torch_name(p): p for p in shapes}
  missing = [n for n in names if n not in state]
  unexpected = [k for k in state if k not in names and not _IGNORED.match(k)]
  misshaped = []
  for name, path in names.items():
    want = _torch_shape(path, shapes[path])
    if name in state and tuple(state[name].shape) != want:
      misshaped.append(f"{name} {list(state[name].shape)} (expected {list(want)})")
  if missing or unexpected or misshaped:
    raise _mismatch_error(what, missing, unexpected, misshaped)
  flat = {p: np.asarray(jnp.asarray(to_flax(p, state[n]), dtype)) for n, p in names.items()}
  return traverse_util.unflatten_dict(flat, sep="/")


def params_to_state(kind: str, params, config, what: str = "the params") -> dict[str, np.ndarray]:
  """Flax params (either GPT layout) -> torch state dict (fp32 numpy), checked against the
  config."""
  if kind == "gpt":
    params = gpt.unstack_layers(dict(params))
  flat = _flatten(params)
  _check_condition(kind, {torch_name(p) for p in flat}, config, what)
  shapes = expected_shapes(kind, config)
  missing = [p for p in shapes if p not in flat]
  unexpected = [p for p in flat if p not in shapes]
  misshaped = [
    f"{p} {list(np.shape(flat[p]))} (expected {list(shapes[p])})"
    for p in shapes
    if p in flat and tuple(np.shape(flat[p])) != shapes[p]
  ]
  if missing or unexpected or misshaped:
    raise _mismatch_error(what, missing, unexpected, misshaped)
  state = {
    torch_name(p): np.ascontiguousarray(to_torch(p, np.asarray(flat[p], np.float32)))
    for p in shapes
  }
  if kind == "vq":
    state["quantize.codebook_used"] = np.zeros((CODEBOOK_USED_SIZE,), np.float32)
  return state


# --------------------------------------------------------------------------------------------------
# Entry points.


def convert(
  kind: str,
  src: str,
  dst: str,
  config,
  ema: bool = False,
  to: str = "jax",
  step: int | None = None,
) -> None:
  """One conversion; every argument is checked before anything is read or written."""
  if kind not in KINDS:
    raise ValueError(f"--kind={kind!r}; expected one of {KINDS}")
  if to not in DIRECTIONS:
    raise ValueError(f"--to={to!r}; expected one of {DIRECTIONS}")
  if step is not None and (to == "jax" or step < 0):
    raise ValueError(
      f"--step={step}; expected a step >= 0 of a training workdir, with --to=torch or --to=params"
    )
  if ema and kind == "vq" and to != "jax":
    raise ValueError("--ema with --kind=vq; VQ training keeps no EMA weights")
  if epath.Path(dst).exists():
    raise ValueError(f"--dst={dst!r} already exists; expected a new path (nothing is overwritten)")
  shapes = expected_shapes(kind, config)  # Validates the config before any file is read.
  if to == "jax":
    params = state_to_params(kind, load_torch_state(src, ema), config, what=f"checkpoint {src}")
    checkpoints.save_params(dst, params)
    return
  params = _read_weights(kind, src, to, ema, step)
  if to == "params":
    checkpoints.check_param_shapes(params, shapes, f"the weights in {src} do not fit the config")
    checkpoints.save_params(dst, params)
    return
  import torch

  state = params_to_state(kind, params, config, what=f"checkpoint {src}")
  state = {"model": {k: torch.from_numpy(v) for k, v in state.items()}}
  files.atomic_write(dst, lambda f: torch.save(state, f))


def _read_weights(kind: str, src: str, to: str, ema: bool, step: int | None):
  """The unscanned params `src` holds: a params directory (--to=torch only: --to=params would copy
  it), or a step of a training workdir. What `src` is gets said before orbax reads any array."""
  trained = (
    ("gpt_workdir", "gpt_checkpoints") if kind == "gpt" else ("vq_workdir", "vq_checkpoints")
  )
  wanted = f"a {kind.upper()} training workdir or its {'vq_' * (kind == 'vq')}checkpoints/ folder"
  if to == "torch":
    trained += (f"{kind}_params",)
    wanted = (
      f"a {kind.upper()} params directory (what npp_jax.convert --kind={kind} writes) or {wanted}"
    )
  found = preflight.expect_weights("--src", src, trained, wanted)
  if found == f"{kind}_params":
    if step is not None or ema:
      raise ValueError(
        f"--src={src!r} is a {kind.upper()} params directory, one set of weights; --step and --ema "
        "pick among the checkpoints of a training workdir"
      )
    return checkpoints.read_params(src)
  folder = epath.Path(src)
  if found == "vq_workdir":
    if step is None and checkpoints.weights_kind(folder / "vq") == "vq_params":
      return checkpoints.read_params(folder / "vq")  # A finished run's final weights.
    folder = folder / "vq_checkpoints"
  elif found == "gpt_workdir":
    folder = folder / "checkpoints"
  params = checkpoints.checkpoint_params(folder, step=step, ema=ema)
  return gpt.unstack_layers(dict(params)) if kind == "gpt" else params


def run(argv: Sequence[str]) -> None:
  """The command line, parsed on a private flag set so that it can be called repeatedly (tests)."""
  fv = flags.FlagValues()
  flags.DEFINE_enum("kind", None, list(KINDS), "Which model: gpt or vq.", flag_values=fv)
  flags.DEFINE_string(
    "src",
    None,
    "PyTorch checkpoint (.pt); with --to=torch|params a params directory or a training workdir.",
    flag_values=fv,
  )
  flags.DEFINE_string(
    "dst", None, "Output: a params directory, or a .pt file with --to=torch.", flag_values=fv
  )
  flags.DEFINE_bool(
    "ema", False, "The EMA weights (of a .pt, or of a training workdir).", flag_values=fv
  )
  flags.DEFINE_integer(
    "step", None, "A training workdir's checkpoint step (default: the latest).", flag_values=fv
  )
  flags.DEFINE_enum(
    "to",
    "jax",
    list(DIRECTIONS),
    "jax: a .pt to a params directory; torch: to a .pt; params: a workdir to a params directory.",
    flag_values=fv,
  )
  cli.define_config(fv, sys_argv=argv, help_string="A config file (config.model, config.vq).")
  cli.parse(argv, fv)  # One-line ValueError for a bad flag, config file or key.
  for name in ("kind", "src", "dst", "config"):
    if fv[name].value is None:
      raise ValueError(
        f"--{name} is required; usage: python -m npp_jax.convert --kind=gpt|vq "
        "--src=FILE|DIR --config=CONFIG --dst=DIR|FILE [--to=torch|params] [--step=N] [--ema]"
      )
  convert(fv.kind, fv.src, fv.dst, fv.config, ema=fv.ema, to=fv.to, step=fv.step)


def inception_state_to_params(
  state: dict[str, np.ndarray], what: str = "the Inception weights"
) -> dict:
  """pytorch-fid's FID Inception state dict (numpy) -> params; every key and shape checked first.

  BN's `num_batches_tracked` counters carry no weights and are skipped.
  """
  shapes = inception.param_shapes()
  names = {inception.torch_name(p): p for p in shapes}
  missing = sorted(n for n in names if n not in state)
  unexpected = sorted(k for k in state if k not in names and not k.endswith("num_batches_tracked"))
  misshaped = []
  for name, path in names.items():
    want = to_torch(path, np.empty(shapes[path], np.uint8)).shape
    if name in state and tuple(state[name].shape) != want:
      misshaped.append(f"{name} {list(state[name].shape)} (expected {list(want)})")
  problems = [f"{what} do not match the FID Inception-v3 ({inception.WEIGHTS_FILE})"]
  if missing:
    problems.append(f"missing {len(missing)} keys, e.g. {missing[0]}")
  if unexpected:
    problems.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
  if misshaped:
    problems.append(f"{len(misshaped)} mis-shaped, e.g. {misshaped[0]}")
  if len(problems) > 1:
    raise ValueError("; ".join(problems))
  flat = {
    path: np.asarray(to_flax(path, np.asarray(state[name], np.float32)), np.float32)
    for name, path in names.items()
  }
  return traverse_util.unflatten_dict(flat, sep="/")


def main(argv: Sequence[str] | None = None) -> int:
  try:
    run(sys.argv if argv is None else argv)
  except cli.USER_ERRORS as e:  # Bad input or the file layer: one `error:` line, exit status 2.
    return cli.report(e)
  return 0


if __name__ == "__main__":
  sys.exit(main())
