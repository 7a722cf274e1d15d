"""The check every mode of `npp_jax.main` runs first: each config field it reads, the workdir, and the kind of
every weights path, before any compile, write or delete (one-line ValueErrors, nothing touched).

`check(mode, config, workdir)` is the entry point. Checks that need data (the code data set's grid, an
image folder's classes) stay with the jobs, which also run them before writing. This module imports no
job, no orbax and no TensorFlow, so a bad command line fails in about a second; it reads a weights path's
kind from its small JSON files (`weights_kind`), never its arrays.
"""

import json
import os
from typing import Any, Callable, Sequence

from etils import epath
import ml_collections

from npp_jax import rules
from npp_jax.rules import BOOL
from npp_jax.rules import CLOSED_FRACTION
from npp_jax.rules import COUNT
from npp_jax.rules import FRACTION
from npp_jax.rules import INT
from npp_jax.rules import NON_EMPTY
from npp_jax.rules import NON_NEGATIVE
from npp_jax.rules import OPEN_FRACTION
from npp_jax.rules import POSITIVE
from npp_jax.rules import POSITIVE_INT
from npp_jax.rules import SIZE
from npp_jax.rules import TEXT
from npp_jax.rules import one_of
from npp_jax.rules import optional

DTYPE_NAMES = rules.DTYPE_NAMES
_get, _expect, _is_int, _is_num = rules.get, rules.expect, rules.is_int, rules.is_num

MODES = ("train", "sample", "extract", "train_vq", "demo", "evaluate", "compile")
AUGS = ("tencrop", "flip", "none")


def _expect_all(config, rules: dict[str, tuple[str, Callable[[Any], bool]]]) -> None:
  for field, rule in rules.items():
    _expect(config, field, rule)


# ------------------------------------------------------------------------------------------- sections

MODEL = {
  "model.name": NON_EMPTY,
  "model.n_layer": SIZE,
  "model.n_head": SIZE,
  "model.dim": SIZE,
  "model.n_kv_head": optional(POSITIVE_INT),
  "model.vocab_size": POSITIVE_INT,
  "model.num_classes": POSITIVE_INT,
  "model.cls_token_num": POSITIVE_INT,
  "model.multiple_of": POSITIVE_INT,
  "model.ffn_dim_multiplier": optional(POSITIVE),
  "model.norm_eps": POSITIVE,
  "model.rope_base": POSITIVE,
  "model.token_dropout": FRACTION,
  "model.resid_dropout": FRACTION,
  "model.ffn_dropout": FRACTION,
  "model.class_dropout": FRACTION,
  "model.dtype": one_of(*DTYPE_NAMES),
  "model.param_dtype": one_of(*DTYPE_NAMES),
  "model.scan_layers": BOOL,
  "model.remat": one_of("none", "full", "dots"),
}
TRAIN = {
  "seed": INT,
  "train.epochs": POSITIVE,
  "train.global_batch_size": POSITIVE_INT,
  "train.grad_accum_steps": POSITIVE_INT,
  "train.max_steps": (
    "-1 (the whole schedule) or a positive integer",
    lambda v: _is_int(v) and (v == -1 or v >= 1),
  ),
  "train.log_every_steps": POSITIVE_INT,
  "train.checkpoint_every_steps": POSITIVE_INT,
  "train.init_from": TEXT,
  "train.profile": BOOL,
  "train.peak_flops_per_device": NON_NEGATIVE,
  "npp.patch_level": one_of(1, 2, 3, 4),
  "optim.lr": POSITIVE,
  "optim.end_lr": NON_NEGATIVE,
  "optim.weight_decay": NON_NEGATIVE,
  "optim.b1": FRACTION,
  "optim.b2": FRACTION,
  "optim.eps": POSITIVE,
  "optim.grad_clip": NON_NEGATIVE,
  "optim.warmup_epochs": NON_NEGATIVE,
  "optim.decay_ratio": CLOSED_FRACTION,
  "optim.ema_decay": FRACTION,
  "data.path": TEXT,
  "data.worker_count": COUNT,
  "data.shuffle_seed": INT,
  "data.eval_split": TEXT,
  "train.eval_every_steps": COUNT,
  "train.eval_batches": COUNT,
  "train.preemption_sync_every_steps": POSITIVE_INT,
}
SAMPLE = {
  "sample.use_ema": BOOL,
  "sample.vq_checkpoint": TEXT,
  "sample.num_images": POSITIVE_INT,
  "sample.cfg_scale": ("a number >= 1 (1 turns guidance off)", lambda v: _is_num(v) and v >= 1),
  "sample.cfg_interval": (
    "-1 (guide every token) or an integer >= 0",
    lambda v: _is_int(v) and v >= -1,
  ),
  "sample.temperature": POSITIVE,
  "sample.top_k": COUNT,
  "sample.top_p": ("a number in (0, 1] (1 = off)", lambda v: _is_num(v) and 0 < v <= 1),
  "sample.seed": INT,
  "sample.batch_size": POSITIVE_INT,
  "sample.dtype": one_of("auto", *DTYPE_NAMES),
  "sample.grid_rows": POSITIVE_INT,
  "sample.grid_cols": POSITIVE_INT,
}
VQ_TRAIN = {
  "vq_train.dataset": NON_EMPTY,
  "vq_train.data_dir": TEXT,
  "vq_train.steps": POSITIVE_INT,
  "vq_train.batch_size": POSITIVE_INT,
  "vq_train.lr": POSITIVE,
  "vq_train.b1": FRACTION,
  "vq_train.b2": FRACTION,
  "vq_train.weight_decay": NON_NEGATIVE,
  "vq_train.grad_clip": NON_NEGATIVE,
  "vq_train.l2_weight": NON_NEGATIVE,
  "vq_train.l1_weight": NON_NEGATIVE,
  "vq_train.random_flip": BOOL,
  "vq_train.log_every_steps": POSITIVE_INT,
  "vq_train.checkpoint_every_steps": POSITIVE_INT,
  "vq_train.seed": INT,
  "vq_train.num_threads": COUNT,
}
EXTRACT = {
  "extract.dataset": NON_EMPTY,
  "extract.data_dir": TEXT,
  "extract.aug": one_of(*AUGS),
  "extract.crop_range": ("a number >= 1", lambda v: _is_num(v) and v >= 1),
  "extract.batch_size": POSITIVE_INT,
  "extract.output": TEXT,
  "extract.keep_shards": BOOL,
  "extract.num_threads": COUNT,
}
DEMO = {
  "demo.seeds": POSITIVE_INT,
  "demo.classifier_epochs": POSITIVE_INT,
  "demo.grid_cols": POSITIVE_INT,
  "demo.png_scale": POSITIVE_INT,
}


def check_model(config) -> None:
  _expect_all(config, MODEL)
  from npp_jax.models import gpt  # The model's own cross-field rules (sizes, heads, RoPE).

  gpt.GPTConfig.from_config(config.model)


def check_mesh(config, num_devices: int) -> tuple[int, ...]:
  shape = _get(config, "mesh.shape")
  if not isinstance(shape, (tuple, list)) or len(shape) != 3 or not all(_is_int(s) for s in shape):
    raise ValueError(
      f"mesh.shape={shape!r}; expected three integers (data, fsdp, tensor), one of them "
      "may be -1 for the devices left, e.g. (-1, 1, 1)"
    )
  from npp_jax import sharding

  return sharding.mesh_shape(shape, num_devices)


def check_vq(config) -> None:
  from npp_jax.models import vq

  vq.VQConfig.from_config(_get(config, "vq"))


def check_keep(config, field: str, checkpoint_dir: epath.Path | None) -> None:
  """Refuses a keep count that would delete every checkpoint of the run (orbax's max_to_keep)."""
  keep = _get(config, field)
  if _is_int(keep) and keep >= 1:
    return
  steps = _steps(checkpoint_dir) if checkpoint_dir is not None else []
  held = (
    f": it would delete the {len(steps)} checkpoints (steps {steps}) in {checkpoint_dir}"
    if steps
    else ": it would delete every checkpoint of the run as it is written"
  )
  raise ValueError(f"{field}={keep!r}; expected a positive integer (checkpoints to keep){held}")


def check_split(config, field: str) -> None:
  from npp_jax import validate

  validate.split_name(_get(config, field), field)


# ------------------------------------------------------------------------------------------- workdir


def check_workdir(workdir) -> epath.Path:
  """A directory this process can write, or a path where one can be made; nothing is created here."""
  if workdir is None or not str(workdir).strip():
    raise ValueError("--workdir is empty; expected a directory for this run's files")
  path = epath.Path(workdir)
  if "://" in str(workdir):  # A bucket: only a write would tell, and the job's first write says it.
    return path
  if path.exists():
    if not path.is_dir():
      raise ValueError(
        f"--workdir={str(workdir)!r} is a file; expected a directory (new or existing)"
      )
    _writable(path, f"--workdir={str(workdir)!r}")
    return path
  parent = path.absolute().parent
  while not parent.exists():
    parent = parent.parent
  if not parent.is_dir():
    raise ValueError(
      f"--workdir={str(workdir)!r} cannot be created: {parent} is a file; expected a path "
      "under a directory"
    )
  _writable(parent, f"--workdir={str(workdir)!r} cannot be created:")
  return path


def _writable(path: epath.Path, what: str) -> None:
  # access() asks the kernel, which refuses a read-only mount even to root (chmod bits do not stop root).
  if not os.access(path, os.W_OK | os.X_OK):
    try:
      read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
      read_only = False
    why = "a read-only file system" if read_only else "no write permission"
    raise ValueError(
      f"{what} {path} is not writable ({why}); expected a directory this process can write"
    )


# ------------------------------------------------------------------------------------- weights kinds

GPT_KINDS = ("gpt_workdir", "gpt_checkpoints", "gpt_params")
VQ_KINDS = ("vq_params",)
_KIND_WORDS = {
  "missing": "does not exist",
  "file": "is a file",
  "text": "is a text file",
  "torch": "is a PyTorch file (convert it first: python -m npp_jax.convert)",
  "empty": "is an empty directory",
  "code_dataset": "is a code data set",
  "gpt_workdir": "is a GPT training workdir",
  "gpt_checkpoints": "is a GPT training checkpoints folder",
  "gpt_params": "is a GPT params directory",
  "vq_workdir": "is a VQ training workdir",
  "vq_checkpoints": "is a VQ training checkpoints folder",
  "vq_params": "is a VQ params directory",
  "unfinished": "holds no finished checkpoint",
  "other": "holds no checkpoint npp_jax knows",
}


def _steps(folder: epath.Path) -> list[int]:
  try:
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir())
  except OSError:
    return []


def _read_json(path: epath.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _params_family(folder: epath.Path) -> str | None:
  """'gpt' / 'vq' from the top-level names of a params directory's orbax tree metadata."""
  meta = _read_json(folder / "_METADATA")
  if not isinstance(meta, dict) or not isinstance(meta.get("tree_metadata"), dict):
    return None
  names = set()
  for key in meta["tree_metadata"]:
    parts = [p.strip(" '\"") for p in key.strip("()").split(",")]
    if len(parts) > 1 and parts[0] == "params":
      names.add(parts[1])
  if names & {"encoder", "decoder", "quantize"}:
    return "vq"
  if names & {"tok_embeddings", "cls_embedding", "output"} or any(
    n.startswith("layers") for n in names
  ):
    return "gpt"
  return None


def _checkpoints_family(folder: epath.Path) -> str | None:
  steps = _steps(folder)
  if not steps:
    return None
  meta = _read_json(folder / str(steps[-1]) / "meta" / "metadata") or {}
  arch = meta.get("architecture", {}) if isinstance(meta, dict) else {}
  if "codebook_size" in arch:
    return "vq"
  return "gpt"


def weights_kind(path) -> str:
  """What a weights path holds, from its small files only: a key of _KIND_WORDS."""
  p = epath.Path(path)
  if not p.exists():
    return "missing"
  if not p.is_dir():
    with p.open("rb") as f:
      head = f.read(512)
    if head.startswith(b"PK") or head.startswith(b"\x80"):  # torch.save's zip, or a legacy pickle.
      return (
        "torch"
        if p.suffix in (".pt", ".pth", ".bin", ".ckpt") or head.startswith(b"\x80")
        else "file"
      )
    return "text" if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "file"
  names = {c.name for c in p.iterdir()}
  if not names:
    return "empty"
  if "code_dataset.json" in names:
    return "code_dataset"
  if "_METADATA" in names or "_CHECKPOINT_METADATA" in names:
    family = _params_family(p)
    return f"{family}_params" if family else "other"
  if "checkpoints" in names:
    return "gpt_workdir" if _steps(p / "checkpoints") else "unfinished"
  if "vq_checkpoints" in names or "vq" in names:
    return "vq_workdir"
  if any(n.isdigit() for n in names):
    family = _checkpoints_family(p)
    return f"{family}_checkpoints" if family else "unfinished"
  return "other"


def expect_weights(field: str, path, accepted: Sequence[str], wanted: str) -> str:
  """One-line ValueError naming what `path` is and what `field` wanted, unless its kind is accepted."""
  kind = weights_kind(path)
  if kind not in accepted:
    raise ValueError(f"{field}={str(path)!r} {_KIND_WORDS[kind]}; expected {wanted}")
  return kind


GPT_WANTED = (
  "a GPT training workdir, its checkpoints/ folder, or a GPT params directory (npp_jax.convert "
  "--kind=gpt)"
)
VQ_WANTED = "a VQ params directory (npp_jax.convert --kind=vq, or WORKDIR/vq of --mode=train_vq)"


# ------------------------------------------------------------------------------------------- modes


def check(
  mode: str,
  config: ml_collections.ConfigDict,
  workdir,
  *,
  num_devices: int | None = None,
  process_count: int | None = None,
) -> None:
  """Every field `mode` reads, the workdir, and the weights it loads; ValueError (one line) on the first
  problem. Reads only small files; writes and deletes nothing."""
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}; expected one of {list(MODES)}")
  if num_devices is None or process_count is None:
    import jax

    num_devices, process_count = jax.device_count(), jax.process_count()
  work = check_workdir(workdir)
  {
    "train": _train,
    "sample": _sample,
    "extract": _extract,
    "train_vq": _train_vq,
    "demo": _demo,
    "evaluate": _evaluate,
    "compile": _compile,
  }[mode](config, work, num_devices, process_count)


def check_local_dataset(field: str, path) -> None:
  """Code data sets are array_record files, which array_record's C++ reader and writer open natively: a
  gs:// (any scheme) path fails there, after the whole extraction or at the first batch."""
  if "://" in str(path):
    raise ValueError(
      f"{field}={str(path)!r} is a {str(path).split('://')[0]}:// path; code data sets "
      "(array_record) need a local or FUSE-mounted directory (e.g. a bucket mounted with "
      "gcsfuse)"
    )


def _train(config, work, num_devices, process_count, *, weights: bool = True) -> None:
  check_model(config)
  _expect_all(config, TRAIN)
  if weights and _expect(config, "evaluate.every_steps", COUNT):
    check_sample_metrics(config, num_devices, process_count)
  check_keep(config, "train.keep_checkpoints", work / "checkpoints")
  check_mesh(config, num_devices)
  from npp_jax import sharding

  sharding.check_batch(
    config.train.global_batch_size,
    config.mesh,
    "train.global_batch_size",
    num_devices=num_devices,
    process_count=process_count,
    micro_batches=config.train.grad_accum_steps,
  )
  if config.data.eval_split:
    check_split(config, "data.eval_split")
  if not config.npp.stages:
    _expect(config, "npp.epoch_rate", OPEN_FRACTION)
  if config.optim.end_lr > config.optim.lr:
    raise ValueError(
      f"optim.end_lr={config.optim.end_lr!r}; expected a number in [0, optim.lr={config.optim.lr}]"
    )
  if not weights:  # The demo makes its own data set and has no init_from.
    return
  if not config.data.path:
    raise ValueError(
      "data.path is empty; expected the directory of a code data set (python -m "
      "npp_jax.npy_codes, or --mode=extract)"
    )
  check_local_dataset("data.path", config.data.path)
  if config.train.init_from:
    expect_weights("train.init_from", config.train.init_from, GPT_KINDS, GPT_WANTED)


def _sample(config, work, num_devices, process_count, *, weights: bool = True) -> None:
  check_model(config)
  _expect_all(config, SAMPLE)
  check_mesh(config, num_devices)
  s = config.sample
  if s.top_k > config.model.vocab_size:
    raise ValueError(
      f"sample.top_k={s.top_k}; expected an integer in [0, model.vocab_size="
      f"{config.model.vocab_size}] (0 = off, 1 = greedy)"
    )
  bad = [c for c in s.classes if not _is_int(c) or not 0 <= c < config.model.num_classes]
  if bad:
    raise ValueError(
      f"sample.classes holds {bad[0]!r}; expected class ids in [0, model.num_classes="
      f"{config.model.num_classes})"
    )
  if s.batch_size % num_devices:
    raise ValueError(
      f"sample.batch_size={s.batch_size} over {num_devices} devices; expected a multiple of "
      f"{num_devices}"
    )
  if not weights:
    return
  if not s.checkpoint:
    raise ValueError(f"sample.checkpoint is empty; expected {GPT_WANTED}")
  expect_weights("sample.checkpoint", s.checkpoint, GPT_KINDS, GPT_WANTED)
  if s.vq_checkpoint:
    check_vq(config)
    expect_weights("sample.vq_checkpoint", s.vq_checkpoint, VQ_KINDS, VQ_WANTED)


def _extract(config, work, num_devices, process_count, *, weights: bool = True) -> None:
  check_vq(config)
  _expect_all(config, EXTRACT)
  check_split(config, "extract.split")
  check_mesh(config, num_devices)
  check_local_dataset(
    "extract.output" if config.extract.output else 'extract.output ("": WORKDIR/codes)',
    config.extract.output or f"{work}/codes",
  )
  if weights:
    path = _get(config, "extract.vq_checkpoint")
    if not path:
      raise ValueError(f"extract.vq_checkpoint is empty; expected {VQ_WANTED}")
    expect_weights("extract.vq_checkpoint", path, VQ_KINDS, VQ_WANTED)
  if config.extract.get("captions"):  # Index and T5 folder (jobs/extract.py holds the checks).
    from npp_jax.jobs import extract

    extract.CaptionExtractSettings.from_config(config)


def _train_vq(config, work, num_devices, process_count) -> None:
  check_vq(config)
  _expect_all(config, VQ_TRAIN)
  check_split(config, "vq_train.split")
  check_keep(config, "vq_train.keep_checkpoints", work / "vq_checkpoints")
  check_mesh(config, num_devices)
  if config.vq_train.l1_weight == 0 and config.vq_train.l2_weight == 0:
    raise ValueError(
      "vq_train.l1_weight and vq_train.l2_weight are both 0; expected a reconstruction loss"
    )


def _compile(config, work, num_devices, process_count) -> None:
  del work, num_devices, process_count  # The run's devices are the slice's, not this machine's.
  from npp_jax.jobs import compile as compile_job

  compile_job.check(config, None)


def _demo(config, work, num_devices, process_count) -> None:
  if "demo" not in config:
    raise ValueError(
      "the config has no `demo` section; expected configs/demo.py (or configs/demo.py:smoke)"
    )
  _expect_all(config, DEMO)
  # The demo makes its own data set and weights: everything else of each stage is checked here.
  _train_vq(config, work, num_devices, process_count)
  _extract(config, work, num_devices, process_count, weights=False)
  _train(config, work, num_devices, process_count, weights=False)
  _sample(config, work, num_devices, process_count, weights=False)


EVALUATE = {
  "evaluate.samples": TEXT,
  "evaluate.reference": TEXT,
  "evaluate.reference_split": TEXT,
  "evaluate.reference_num_images": POSITIVE_INT,
  "evaluate.data_dir": TEXT,
  "evaluate.image_size": POSITIVE_INT,
  "evaluate.inception": TEXT,
  "evaluate.preprocess": one_of("adm", "pytorch_fid"),
  "evaluate.resize_to": (
    "an integer >= 75 (Inception-v3's smallest input; 299 is the published one)",
    lambda v: _is_int(v) and v >= 75,
  ),
  "evaluate.batch_size": POSITIVE_INT,
  "evaluate.num_samples": COUNT,
  "evaluate.every_steps": COUNT,
  "evaluate.fid_method": one_of("sqrtm", "eigh"),
  "evaluate.neighbours": POSITIVE_INT,
  "evaluate.is_split_size": POSITIVE_INT,
  "evaluate.distance_block": POSITIVE_INT,
}


def check_sample_metrics(config, num_devices: int, process_count: int) -> None:
  """evaluate.every_steps > 0: training also samples (config.sample) and scores (config.evaluate); the
  fields both read, and the files named (npp_jax.evaluators.sample_metrics loads and checks their contents)."""
  _evaluate(config, None, num_devices, process_count)
  _sample(config, None, num_devices, process_count, weights=False)
  e, s = config.evaluate, config.sample
  if e.num_samples < e.neighbours + 1:
    raise ValueError(
      f"evaluate.num_samples={e.num_samples!r} with evaluate.every_steps={e.every_steps}; "
      f"expected at least {e.neighbours + 1} samples per evaluation (precision and recall use "
      f"k = {e.neighbours} neighbours)"
    )
  if s.use_ema and not config.optim.ema_decay > 0:
    raise ValueError(
      "sample.use_ema=True with evaluate.every_steps set, but optim.ema_decay=0 keeps no EMA; "
      "expected optim.ema_decay > 0 or sample.use_ema=False"
    )
  if not s.vq_checkpoint:
    raise ValueError(
      "evaluate.every_steps is set but sample.vq_checkpoint is empty; expected "
      + VQ_WANTED
      + " to decode the samples into images"
    )
  check_vq(config)
  expect_weights("sample.vq_checkpoint", s.vq_checkpoint, VQ_KINDS, VQ_WANTED)
  if not e.reference:
    raise ValueError(
      "evaluate.every_steps is set but evaluate.reference is empty; expected an ADM "
      "reference npz, a statistics npz of --mode=evaluate, or a data set"
    )
  if not e.inception or not epath.Path(e.inception).exists():
    raise ValueError(
      f"evaluate.inception={e.inception!r} "
      + ("is empty" if not e.inception else "does not exist")
      + " while evaluate.every_steps is set; expected pytorch-fid's "
      "pt_inception-2015-12-05-6726825d.pth or the params directory --mode=evaluate made"
    )


def _evaluate(config, work, num_devices, process_count) -> None:
  # The files themselves (samples, reference, weights) are opened and checked by npp_jax.jobs.evaluate, still
  # before it writes anything: their checks read array headers and weights, more than this module reads.
  _expect_all(config, EVALUATE)
  check_mesh(config, num_devices)
  from npp_jax import sharding

  sharding.check_batch(
    config.evaluate.batch_size,
    config.mesh,
    "evaluate.batch_size",
    num_devices=num_devices,
    process_count=process_count,
  )
