"""Checkpoints: one Checkpointer for every trainer (GPT and VQ), params directories, preemption,
shape checks, and what a weights path holds (`weights_kind`, from its small files only).

A trainer's checkpoint folder (WORKDIR/checkpoints, WORKDIR/vq_checkpoints) holds one orbax step
directory per kept step with three items: `state` (the train state), `data` (the input's position,
so a resumed run sees the batches it would have seen) and `meta` (the architecture and step, to
refuse resuming a workdir of another model).

A params directory holds `{"params": params}` written by orbax's StandardCheckpointer: what
npp_jax.convert makes of a PyTorch release, what train_vq leaves at its end, and what sampling,
extraction and init_from read. Every weight load of the project goes through this module.

Paths go through etils.epath, so `gs://...` (and any scheme epath knows) works wherever a local path
does. orbax loads at its first use: a job's check reads a path's kind here without it.
"""

import json
import signal
from typing import Any, Sequence

from absl import logging
from etils import epath
from etils import epy
import jax
import numpy as np

from npp_jax import files
from npp_jax.models import gpt
from npp_jax.models import vq

with epy.lazy_imports():
  import orbax.checkpoint as ocp

# Fields that change the parameter shapes or their meaning; anything else may change between runs.
ARCH_FIELDS = (
  "name",
  "n_layer",
  "n_head",
  "dim",
  "n_kv_head",
  "vocab_size",
  "num_classes",
  "multiple_of",
  "ffn_dim_multiplier",
  "scan_layers",
)
VQ_ARCH_FIELDS = (
  "codebook_size",
  "codebook_embed_dim",
  "z_channels",
  "ch",
  "ch_mult",
  "num_res_blocks",
  "image_size",
  "param_dtype",
)
# A text model (model.condition="text") has no class table but a caption width and length.
TEXT_ARCH_FIELDS = ("condition", "cls_token_num", "caption_dim")
# What a field means when a checkpoint's meta predates it.
_ARCH_DEFAULTS = {"condition": "class"}
_ITEMS = ("state", "data", "meta")


def architecture(section, fields: Sequence[str] = ARCH_FIELDS) -> dict:
  """The fields of a config section (config.model, or config.vq with VQ_ARCH_FIELDS) as JSON
  values."""
  if fields is ARCH_FIELDS and section.get("condition", "class") != "class":
    fields = [f for f in fields if f != "num_classes"] + list(TEXT_ARCH_FIELDS)
  elif fields is ARCH_FIELDS:
    fields = [*fields, "condition"]
  return {
    f: list(section[f]) if isinstance(section[f], (tuple, list)) else section[f] for f in fields
  }


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the files are always left as they are."""


class CheckpointSaveError(OSError):
  """A checkpoint that could not be written (a full disk, permissions); the finished ones are left
  intact."""


class Preemption:
  """SIGTERM (TPU maintenance, SLURM time limit) asks the loop to save and stop at the next step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except (
      ValueError
    ):  # Not the main thread (e.g. a notebook worker): no handler, no preemption save.
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


# ------------------------------------------------------------------------------------------- shapes


def param_shapes_of(params) -> dict[str, tuple[int, ...]]:
  """{"a/b/kernel": shape} of a params tree (dict keys joined by "/")."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(x)) for path, x in flat}


def check_param_shapes(params, expected: dict[str, tuple[int, ...]], what: str) -> None:
  """One-line ValueError `{what}: {path} is {shape} there, {shape} in the config` at the first path
  (in sorted order) that is missing, unexpected or of another shape; nothing when `params` fits
  `expected`."""
  got = param_shapes_of(params)
  want = {k: tuple(v) for k, v in expected.items()}
  if got == want:
    return
  first = (sorted(set(got) ^ set(want)) or sorted(k for k in want if got[k] != want[k]))[0]
  raise ValueError(
    f"{what}: {first} is {got.get(first, 'missing')} there, {want.get(first, 'absent')} "
    "in the config"
  )


def check_gpt_params(params, model_config, what: str) -> None:
  """One-line error when a parameter tree does not have the shapes of config.model (naming the
  release size it looks like, if any)."""
  got = param_shapes_of(gpt.unstack_layers(params))
  condition = "text" if "cls_embedding/cap_proj/fc1/kernel" in got else "class"
  if condition != model_config.condition:
    raise ValueError(
      f"{what} is a {condition}-conditional model but model.condition="
      f"{model_config.condition!r}; expected a checkpoint of the configured condition"
    )
  n_layer = sum(1 for k in got if k.startswith("layers_") and k.endswith("attention/wo/kernel"))
  dim = got.get("tok_embeddings/embedding", (0, 0))[-1]
  names = [name for name, (l, _, d) in gpt.MODEL_SIZES.items() if (l, d) == (n_layer, dim)]
  size = f" (it looks like {names[0]})" if names else ""
  try:
    check_param_shapes(
      gpt.unstack_layers(params),
      gpt.param_shapes(model_config),
      f"{what} does not fit model.name={model_config.name!r}{size}",
    )
  except ValueError as e:
    raise ValueError(
      f"{e}; expected a checkpoint of the configured model (set --config.model.name)"
    ) from None


# ------------------------------------------------------------------------------------- Checkpointer


class Checkpointer:
  """Keeps the last N checkpoints of one run; every public method is safe on a fresh directory.

  `architecture` (see `architecture()`) is written with every step and checked by
  `check_architecture`; it may be left out only to read (latest_step, restore).
  """

  def __init__(
    self, directory, *, keep: int, architecture: dict | None = None, async_save: bool = True
  ):
    self.directory = files.absolute(directory)
    self.architecture = architecture
    self._pending, self._failed = (
      None,
      False,
    )  # The step of the async save in flight; a save failed.
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def check_architecture(self) -> None:
    """Refuse a workdir whose latest checkpoint was written for another model (before any
    compile)."""
    step = self.latest_step()
    if step is None:
      return
    saved = self._read_meta(step).get("architecture", {})
    want = self.architecture or {}
    saved = {k: saved.get(k, _ARCH_DEFAULTS.get(k)) for k in want}
    diff = {k: (saved[k], want[k]) for k in want if saved[k] != want[k]}
    if diff:
      pretty = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
      raise CheckpointError(
        f"{self.directory} holds a checkpoint of another model ({pretty}); "
        "expected the same architecture: use another --workdir"
      )

  def _corrupt(self, step: int, e: Exception) -> CheckpointError:
    first = str(e).splitlines()[0][:200] if str(e) else ""
    return CheckpointError(
      f"checkpoint step {step} in {self.directory} is corrupt or partial "
      f"({type(e).__name__}{': ' + first if first else ''}); it was left untouched: "
      "move it away to resume from an earlier step"
    )

  def _read_meta(self, step: int) -> dict:
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(out["meta"])
    except Exception as e:  # Orbax raises many types for unreadable files; all mean the same here.
      raise self._corrupt(step, e) from None

  def restore(self, abstract_state: Any) -> tuple[Any, dict, int]:
    """(state placed as abstract_state's shardings, data iterator state, step) of the latest
    step."""
    step = self.latest_step()
    args = ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore(),
    )
    try:
      out = self._manager.restore(step, args=args)
    except Exception as e:
      raise self._corrupt(step, e) from None
    return out["state"], dict(out["data"]), step

  def save(
    self, step: int, state: Any, data_state: dict | None = None, *, force: bool = False
  ) -> bool:
    if self.architecture is None:
      raise ValueError(
        f"Checkpointer({self.directory}) was opened without an architecture; expected one to save"
      )
    meta = {"architecture": self.architecture, "step": int(step)}
    args = ocp.args.Composite(
      state=ocp.args.StandardSave(_host_replicas(state)),
      data=ocp.args.JsonSave(data_state or {}),
      meta=ocp.args.JsonSave(meta),
    )
    self.check_saves()  # An earlier save that failed stops the run before another one starts.
    try:
      saved = self._manager.save(step, args=args, force=force)
    except (
      Exception
    ) as e:  # orbax reports an earlier async save's failure here, or this save's own.
      earlier = self._pending is not None and not _finished(self.directory / str(self._pending))
      raise self._save_failed(self._pending if earlier else int(step), e) from None
    if saved:
      self._pending = int(step)
    return saved

  def check_saves(self, step: int | None = None) -> None:
    """CheckpointSaveError once the pending asynchronous save has ended without its step folder.
    Cheap: the trainers call it after every step (a loop hook), so a full disk stops the run right
    after the save that failed, not one checkpoint interval later when orbax would first report
    it."""
    del step  # The loop hook's argument.
    if self._pending is None or self._manager.is_saving_in_progress():
      return
    pending, self._pending = self._pending, None
    if not _finished(self.directory / str(pending)):
      try:
        self._manager.wait_until_finished()
        cause = None
      except Exception as e:  # noqa: BLE001  orbax re-raises the background thread's error here.
        cause = e
      raise self._save_failed(pending, cause)

  def _save_failed(self, step: int | None, e: Exception | None) -> CheckpointSaveError:
    if not self._failed:
      self._failed = True
      try:  # Stop orbax's save threads now: left running, they fail again at exit, with tracebacks.
        self._manager.close()
      except Exception:  # noqa: BLE001  The error that matters is the one being raised.
        pass
    good = [s for s in finished_steps(self.directory) if s != step]
    last = f"step {good[-1]} (left intact)" if good else "none (no step of this run finished)"
    return CheckpointSaveError(
      f"saving checkpoint step {step} in {self.directory} failed: {_cause(e)}; the "
      f"run stopped there; the last good checkpoint is {last}"
    )

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # noqa: BLE001
      raise self._save_failed(self._pending, e) from None
    self.check_saves()

  def close(self) -> None:
    if self._failed:  # _save_failed closed the manager; there is no second error to say.
      return
    try:
      self.wait()
    finally:
      if not self._failed:
        self._manager.close()


def _finished(step_dir: epath.Path) -> bool:
  # A local save renames its temporary folder at the end; on a bucket the marker file says it
  # finished.
  return step_dir.exists() and (
    "://" not in str(step_dir) or (step_dir / "commit_success.txt").exists()
  )


def finished_steps(directory: epath.Path) -> list[int]:
  try:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and _finished(p))
  except OSError:
    return []


def _cause(e: Exception | None) -> str:
  """The OS reason inside orbax's and tensorstore's wrapped errors, else their first line."""
  if e is None:
    return "the step folder was not written"
  text = " ".join(str(e).split())
  for reason in (
    "No space left on device",
    "Disk quota exceeded",
    "Read-only file system",
    "Permission denied",
    "File too large",
  ):
    if reason in text:
      return f"{reason} ({type(e).__name__})"
  return f"{type(e).__name__}: {text[:200]}"


def _host_replicas(state):
  """On one process, every multi-device leaf as one host copy. Orbax's replica-parallel save slices
  each replicated shard with small jitted ops: hundreds of compiles on a CPU mesh (the VQ's whole
  state), and under jax.set_mesh (the GPT trainer) jax 0.7, our lower bound, refuses them
  (single-device arguments in a mesh context). The bytes written and restored are the same; restore
  places them by the target."""
  if jax.process_count() > 1:
    return state

  def one(x):
    if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
      return np.asarray(x.addressable_data(0)) if x.sharding.is_fully_replicated else np.asarray(x)
    return x

  return jax.tree.map(one, state)


# ------------------------------------------------------------------------------- params directories


def save_params(path, params) -> None:
  """Write `{"params": params}` to a new directory `path` (never over an existing one)."""
  target = files.absolute(path)
  if target.exists():
    raise ValueError(f"{path!r} already exists; expected a new path (nothing is overwritten)")
  if jax.process_count() > 1:  # Every process has looked before the save (a collective) creates it.
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices("npp_jax.checkpoints.save_params")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, {"params": params})


def read_params(path, target=None):
  """The params tree of a params directory (`save_params`, npp_jax.convert).

  `target`: optional pytree of jax.ShapeDtypeStruct (with shardings) matching the params, to restore
  straight into sharded device arrays; without it, arrays come back unsharded.
  """
  p = files.absolute(path)
  if not p.is_dir():
    raise ValueError(
      f"checkpoint path {str(path)!r} is not a directory; expected one written by "
      "npp_jax.convert or train_vq (an orbax checkpoint holding {'params': ...})"
    )
  if target is None:
    # Saved on other devices (e.g. by another process count): restore onto one local device.
    one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
      restored = ckptr.restore(p, args=ocp.args.StandardRestore(fallback_sharding=one_device))
  else:
    with ocp.StandardCheckpointer() as ckptr:
      restored = ckptr.restore(p, {"params": target})
  if not isinstance(restored, dict) or "params" not in restored:
    raise ValueError(
      f"{path} holds no 'params' entry; expected a checkpoint written by npp_jax.convert"
    )
  return restored["params"]


def load_vq_params(path, vq_config) -> dict:
  """VQ params from a params directory, checked against config.vq's architecture (one-line
  error)."""
  params = read_params(path)
  check_param_shapes(
    params, vq.param_shapes(vq_config), f"VQ parameters in {path} do not fit config.vq"
  )
  return params


# ------------------------------------------------------------------------------------ weights kinds

# What weights_kind says of a path, as the words of an error message ("PATH is a code data set").
KIND_WORDS = {
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


def steps(folder: epath.Path) -> list[int]:
  """The step folders of a checkpoints folder (orbax names them by step), sorted."""
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
  found = steps(folder)
  if not found:
    return None
  meta = _read_json(folder / str(found[-1]) / "meta" / "metadata") or {}
  arch = meta.get("architecture", {}) if isinstance(meta, dict) else {}
  return "vq" if "codebook_size" in arch else "gpt"


def _file_kind(p: epath.Path) -> str:
  with p.open("rb") as f:
    head = f.read(512)
  if head.startswith(b"PK") or head.startswith(b"\x80"):  # torch.save's zip, or a legacy pickle.
    torch_like = p.suffix in (".pt", ".pth", ".bin", ".ckpt") or head.startswith(b"\x80")
    return "torch" if torch_like else "file"
  return "text" if head and all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "file"


def weights_kind(path) -> str:
  """What a weights path holds, from its small files only: a key of KIND_WORDS."""
  p = epath.Path(path)
  if not p.exists():
    return "missing"
  if not p.is_dir():
    return _file_kind(p)
  names = {c.name for c in p.iterdir()}
  if not names:
    return "empty"
  if "code_dataset.json" in names:
    return "code_dataset"
  if "_METADATA" in names or "_CHECKPOINT_METADATA" in names:
    family = _params_family(p)
    return f"{family}_params" if family else "other"
  if "checkpoints" in names:
    return "gpt_workdir" if steps(p / "checkpoints") else "unfinished"
  if "vq_checkpoints" in names or "vq" in names:
    return "vq_workdir"
  if any(n.isdigit() for n in names):
    family = _checkpoints_family(p)
    return f"{family}_checkpoints" if family else "unfinished"
  return "other"


def load_torch_inception(path, what: str) -> dict:
  """pytorch-fid's FID Inception .pth file -> params, every key and shape checked."""
  from npp_jax import convert  # The PyTorch reader: loaded only for a .pth file.

  return convert.inception_state_to_params(convert.load_torch_state(str(path)), what=what)


def _is_manager_dir(path: epath.Path) -> bool:
  return path.is_dir() and bool(steps(path))


def load_params(path, *, ema: bool = False) -> dict:
  """Unscanned GPT parameters from a training workdir, its checkpoints/ folder, or a params
  directory.

  With ema=True the EMA weights are returned when the run kept them (an error otherwise).
  """
  p = files.absolute(path)
  if not p.exists():
    raise CheckpointError(
      f"checkpoint path {str(path)!r} does not exist; expected a training workdir, its "
      "checkpoints/ folder, or a directory written by npp_jax.convert"
    )
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  if not _is_manager_dir(p):  # A converted release checkpoint.
    if ema:
      raise CheckpointError(
        f"{p} is a converted checkpoint; it holds one set of weights (convert with "
        "--ema to take the release's EMA weights)"
      )
    return gpt.unstack_layers(read_params(p))
  return gpt.unstack_layers(checkpoint_params(p, ema=ema))


def checkpoint_params(directory, *, step: int | None = None, ema: bool = False) -> dict:
  """The params (EMA with ema=True) of step `step` (the latest when None) of a trainer's
  checkpoints folder (WORKDIR/checkpoints, WORKDIR/vq_checkpoints), in the layout they were saved
  in, on one local device."""
  p = files.absolute(directory)
  steps = finished_steps(p)
  if not steps:
    raise CheckpointError(f"{p} holds no finished checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise CheckpointError(f"{p} holds no checkpoint of step {step}; expected one of {steps}")
  manager = ocp.CheckpointManager(
    p, item_names=_ITEMS, options=ocp.CheckpointManagerOptions(read_only=True)
  )
  # A run saved by several processes names devices this process lacks: restore onto one device.
  one_device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  try:
    state = manager.restore(
      step, args=ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=one_device))
    )["state"]
  except Exception as e:
    raise CheckpointError(
      f"checkpoint step {step} in {p} is corrupt or partial ({type(e).__name__})"
    ) from None
  if ema:
    if "code_ema" in state:  # train_vq's state: its "EMA" is code usage, not weights.
      raise CheckpointError(f"{p} is a VQ run's; VQ training keeps no EMA weights")
    if not state.get("ema"):
      raise CheckpointError(
        f"checkpoint step {step} in {p} has no EMA weights (train.ema_decay was "
        "0); expected a run trained with optim.ema_decay > 0, or use_ema=False"
      )
    params = state["ema"]
  else:
    params = state["params"]
  logging.info("Loaded parameters of step %d from %s%s.", step, p, " (EMA)" if ema else "")
  return jax.tree.map(lambda x: x, params)
