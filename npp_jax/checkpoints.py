"""Training checkpoints: orbax CheckpointManager under WORKDIR/checkpoints, resume, and parameter loading.

A step directory holds three items: `state` (params, optimizer state, EMA, step, RNG), `data` (the input
iterator's position, so a resumed run sees the batches it would have seen) and `meta` (the model
architecture, to refuse resuming a workdir with another model).
"""
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

# Fields that change the parameter shapes or their meaning; anything else may change between runs.
ARCH_FIELDS = ("name", "n_layer", "n_head", "dim", "n_kv_head", "vocab_size", "num_classes",
               "multiple_of", "ffn_dim_multiplier", "scan_layers")


def architecture(model_config) -> dict:
  return {f: model_config[f] for f in ARCH_FIELDS}


class CheckpointError(ValueError):
  """A checkpoint that cannot be used; the files are always left as they are."""


class Checkpointer:
  """Keeps the last N checkpoints of one run; every public method is safe on a fresh directory."""

  def __init__(self, directory: str, *, keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=False, enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def check_architecture(self, model_config) -> None:
    """Refuse a workdir whose latest checkpoint was written for another model (before any compile)."""
    step = self.latest_step()
    if step is None:
      return
    meta = self._read_meta(step)
    want = architecture(model_config)
    saved = meta.get("architecture", {})
    diff = {k: (saved.get(k), want[k]) for k in want if saved.get(k) != want[k]}
    if diff:
      pretty = ", ".join(f"{k}: checkpoint {a!r} vs config {b!r}" for k, (a, b) in diff.items())
      raise CheckpointError(f"{self.directory} holds a checkpoint of another model ({pretty}); "
                            "expected the same architecture: use another --workdir")

  def _read_meta(self, step: int) -> dict:
    try:
      out = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(out["meta"])
    except Exception as e:  # Orbax raises many types for unreadable files; all mean the same here.
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} is corrupt or partial ({type(e).__name__}); "
          "it was left untouched: move it away to resume from an earlier step") from None

  def restore(self, abstract_state: Any) -> tuple[Any, dict, int]:
    """(state placed as abstract_state's shardings, data iterator state, step) of the latest step."""
    step = self.latest_step()
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
    try:
      out = self._manager.restore(step, args=args)
    except Exception as e:
      raise CheckpointError(
          f"checkpoint step {step} in {self.directory} is corrupt or partial "
          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); it was left "
          "untouched: move it away to resume from an earlier step") from None
    return out["state"], dict(out["data"]), step

  def save(self, step: int, state: Any, data_state: dict, model_config, force: bool = False) -> bool:
    meta = {"architecture": architecture(model_config), "step": int(step)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              meta=ocp.args.JsonSave(meta))
    return self._manager.save(step, args=args, force=force)

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _is_manager_dir(path: str) -> bool:
  return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def load_params(path: str, *, ema: bool = False) -> dict:
  """Unscanned parameters from a training workdir, its checkpoints/ folder, or a converted checkpoint.

  With ema=True the EMA weights are returned when the run kept them (an error otherwise).
  """
  from npp_jax.models import gpt  # Local: keeps this module importable by the converter.

  if not os.path.exists(path):
    raise CheckpointError(f"checkpoint path {path!r} does not exist; expected a training workdir, its "
                          "checkpoints/ folder, or a directory written by npp_jax.convert")
  if os.path.isdir(os.path.join(path, "checkpoints")):
    path = os.path.join(path, "checkpoints")
  if not _is_manager_dir(path):
    from npp_jax import convert  # A converted release checkpoint.
    if ema:
      raise CheckpointError(f"{path} is a converted checkpoint; it holds one set of weights (convert with "
                            "--ema to take the release's EMA weights)")
    return gpt.unstack_layers(convert.load_params(path))
  manager = ocp.CheckpointManager(os.path.abspath(path), item_names=("state", "data", "meta"),
                                  options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"{path} holds no finished checkpoint")
  try:
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  except Exception as e:
    raise CheckpointError(f"checkpoint step {step} in {path} is corrupt or partial "
                          f"({type(e).__name__})") from None
  if ema:
    if not state.get("ema"):
      raise CheckpointError(f"checkpoint step {step} in {path} has no EMA weights (train.ema_decay was "
                            "0); expected a run trained with optim.ema_decay > 0, or use_ema=False")
    params = state["ema"]
  else:
    params = state["params"]
  logging.info("Loaded parameters of step %d from %s%s.", step, path, " (EMA)" if ema else "")
  return gpt.unstack_layers(jax.tree.map(lambda x: x, params))
