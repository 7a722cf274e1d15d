"""What a job's check needs beyond the rules of its config sections: the workdir, the kind of each
weights path, a keep count against the checkpoints it would delete, and the rules that join two
sections.

Every job's `check` (npp_jax.jobs) calls these after building its sections' settings, before
anything is loaded, compiled, written or deleted; the one-line ValueErrors leave every file as it
was. Nothing here reads more than a path's small files (`checkpoints.weights_kind`), and orbax, TFDS
and torch stay unloaded, so a bad command line fails in about a second.
"""

import os
from typing import Sequence

from etils import epath

from npp_jax import checkpoints
from npp_jax import rules

GPT_KINDS = ("gpt_workdir", "gpt_checkpoints", "gpt_params")
VQ_KINDS = ("vq_params",)
GPT_WANTED = (
  "a GPT training workdir, its checkpoints/ folder, or a GPT params directory (npp_jax.convert "
  "--kind=gpt)"
)
VQ_WANTED = "a VQ params directory (npp_jax.convert --kind=vq, or WORKDIR/vq of --mode=train_vq)"


def check_workdir(workdir) -> epath.Path:
  """A directory this process can write, or a path where one can be made; nothing is created
  here."""
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
  # access() asks the kernel, which refuses a read-only mount even to root (chmod bits do not stop
  # root).
  if not os.access(path, os.W_OK | os.X_OK):
    try:
      read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
      read_only = False
    why = "a read-only file system" if read_only else "no write permission"
    raise ValueError(
      f"{what} {path} is not writable ({why}); expected a directory this process can write"
    )


def check_keep(config, field: str, checkpoint_dir: epath.Path) -> None:
  """A keep count that would delete every checkpoint of the run (orbax's max_to_keep), refused with
  the checkpoints it would delete; run before the section's own rule (rules.KEEP), which says
  less."""
  keep = rules.get(config, field)
  if rules.KEEP[1](keep):
    return
  steps = checkpoints.steps(checkpoint_dir)
  held = (
    f": it would delete the {len(steps)} checkpoints (steps {steps}) in {checkpoint_dir}"
    if steps
    else ": it would delete every checkpoint of the run as it is written"
  )
  raise ValueError(f"{field}={keep!r}; expected {rules.KEEP[0]}{held}")


def expect_weights(field: str, path, accepted: Sequence[str], wanted: str) -> str:
  """One-line ValueError naming what `path` is and what `field` wanted, unless its kind is
  accepted."""
  if not path:
    raise ValueError(f"{field} is empty; expected {wanted}")
  kind = checkpoints.weights_kind(path)
  if kind not in accepted:
    raise ValueError(f"{field}={str(path)!r} {checkpoints.KIND_WORDS[kind]}; expected {wanted}")
  return kind


def check_vq_fits(vq_cfg, model_cfg) -> None:
  """The tokenizer (config.vq) must be the one the GPT's codes come from: its codebook and its
  grid."""
  if vq_cfg.codebook_size != model_cfg.vocab_size:
    raise ValueError(
      f"vq.codebook_size={vq_cfg.codebook_size} but model.vocab_size={model_cfg.vocab_size}; "
      "expected the tokenizer the model's codes come from"
    )
  if vq_cfg.grid != tuple(model_cfg.grid):
    raise ValueError(
      f"vq.image_size={vq_cfg.image_size} with downsampling {vq_cfg.downsample} gives "
      f"{vq_cfg.grid[0]}x{vq_cfg.grid[1]} codes but model.grid={tuple(model_cfg.grid)}; "
      "expected the same grid"
    )
