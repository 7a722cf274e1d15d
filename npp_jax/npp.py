"""Next Patch Prediction: the whole idea of the paper in one module.

1. `aggregate`: token embeddings of a code grid averaged over k x k blocks -> a k^2 shorter
sequence.
2. `group_targets`: the k^2 ground-truth tokens of every patch, in the same raster order.
3. `patch_loss`: one output distribution per position scored against all k^2 tokens of the next
patch.
4. `Schedule`: coarse-to-fine stages of decreasing k ending at k = 1, and the learning rate of each
   stage (`NPPSettings` is the config's `npp` section that chooses them).

Nothing here knows about the transformer: the model calls `aggregate` on its embeddings, the trainer
calls `group_targets` and `patch_loss` on its logits and `Schedule` for k and the learning rate at a
step.
"""

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import optax

from npp_jax import optim
from npp_jax import rules

PATCH_SIZES = (1, 2, 4, 8)


def check_patch_size(k: int, grid: Sequence[int]) -> None:
  """One-line error for a patch size the grid cannot be cut into."""
  h, w = grid
  if not isinstance(k, int) or k < 1 or h % k or w % k:
    raise ValueError(
      f"patch size k={k!r} does not divide the {h}x{w} code grid; expected a positive integer "
      f"dividing both sides, e.g. one of {[p for p in PATCH_SIZES if h % p == 0 and w % p == 0]}"
    )


def _blocks(x: jax.Array, grid: Sequence[int], k: int) -> jax.Array:
  """[B, h*w, ...] -> [B, h/k, w/k, k, k, ...]: blocks in raster order, tokens raster order
  inside."""
  h, w = grid
  b, rest = x.shape[0], x.shape[2:]
  x = x.reshape(b, h // k, k, w // k, k, *rest)
  return jnp.moveaxis(x, 2, 3)


@functools.partial(jax.jit, static_argnames=("grid", "k"))
def aggregate(emb: jax.Array, grid: tuple[int, int], k: int) -> jax.Array:
  """Mean of token embeddings over k x k blocks: [B, h*w, D] -> [B, (h/k)*(w/k), D]. No
  parameters."""
  check_patch_size(k, grid)
  if k == 1:
    return emb
  b, _, d = emb.shape
  blocks = _blocks(emb, grid, k)  # [B, h/k, w/k, k, k, D]
  # Sum in fp32: a bf16 mean of 64 values (k = 8) would lose the low bits of every embedding.
  mean = blocks.astype(jnp.float32).mean(axis=(3, 4)).astype(emb.dtype)
  return mean.reshape(b, -1, d)


@functools.partial(jax.jit, static_argnames=("k",))
def group_targets(tokens: jax.Array, k: int) -> jax.Array:
  """Tokens [B, h, w] -> targets [B, (h/k)*(w/k), k*k]: the k^2 tokens of each patch, raster
  order."""
  b, h, w = tokens.shape
  check_patch_size(k, (h, w))
  blocks = _blocks(tokens.reshape(b, h * w), (h, w), k)  # [B, h/k, w/k, k, k]
  return blocks.reshape(b, (h // k) * (w // k), k * k)


@jax.jit
def patch_loss(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Mean over positions of -(1/k^2) sum_i log p(t_i): logits [B, N, V], targets [B, N, k^2].

  The release repeats the logits k^2 times and calls cross-entropy; the same number is
  logsumexp(logits) - mean_i logits[t_i] per position, which needs no copy of the logits.
  `mask` [B, N] (1 = counted) lets callers drop padding rows.
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, N]
  picked = jnp.take_along_axis(logits, targets.astype(jnp.int32), axis=-1)  # [B, N, k^2]
  per_pos = lse - picked.mean(axis=-1)
  if mask is None:
    return per_pos.mean()
  mask = mask.astype(jnp.float32)
  return (per_pos * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def shift_inputs(cond: jax.Array, patches: jax.Array) -> jax.Array:
  """Model input: [condition embedding(s)] + patch embeddings without the last patch.

  The sequence is cond_len + n - 1 long; its last n outputs predict patches 0..n-1, each output
  seeing only the condition and the patches before the one it predicts.
  """
  return jnp.concatenate([cond.astype(patches.dtype), patches[:, :-1]], axis=1)


# --------------------------------------------------------------------------------------------------
# The coarse-to-fine schedule.


@dataclasses.dataclass(frozen=True)
class Stage:
  k: int
  start_step: int  # First step of the stage (inclusive).
  end_step: int  # First step of the next stage (exclusive).
  epochs: float

  @property
  def num_steps(self) -> int:
    return self.end_step - self.start_step


@dataclasses.dataclass(frozen=True)
class NPPSettings:
  """config.npp: the release's (patch_level L, epoch_rate r) over train.epochs, or explicit stages
  ((k, epochs), ...) that then define the run's length (NPP.md 5)."""

  patch_level: int = 3
  epoch_rate: float = 0.5
  stages: tuple = ()

  def __post_init__(self):
    rules.check("npp.patch_level", self.patch_level, rules.one_of(1, 2, 3, 4))
    rules.check("npp.stages", self.stages, _STAGES)
    if not self.stages:
      rules.check("npp.epoch_rate", self.epoch_rate, rules.OPEN_FRACTION)

  @classmethod
  def from_config(cls, config) -> "NPPSettings":
    n = rules.section(config, "npp", cls)
    stages = n["stages"]
    if isinstance(stages, (tuple, list)):
      stages = tuple(tuple(s) if isinstance(s, (tuple, list)) else s for s in stages)
    return cls(**{**n, "stages": stages})

  def stages_for(self, epochs: float) -> list[tuple[int, float]]:
    """(k, epochs) per stage: the explicit stages, else the release's over `epochs`."""
    if self.stages:
      return [(int(k), float(e)) for k, e in self.stages]
    return release_stages(self.patch_level, self.epoch_rate, epochs)


_STAGES = (
  "() or pairs (k, epochs) of a positive integer k and positive epochs",
  lambda v: (
    isinstance(v, tuple)
    and all(
      isinstance(s, tuple)
      and len(s) == 2
      and rules.is_int(s[0])
      and s[0] >= 1
      and rules.is_num(s[1])
      for s in v
    )
  ),
)


def release_stages(patch_level: int, epoch_rate: float, epochs: int) -> list[tuple[int, float]]:
  """(k, epochs) per stage as the release computes them: ends at int(E * r^i), i = L-1 .. 0."""
  NPPSettings(patch_level, epoch_rate)  # The config's rules for both.
  rules.check("train.epochs", epochs, rules.POSITIVE)
  ends = [int(epochs * epoch_rate**i) for i in range(patch_level - 1, -1, -1)]
  ks = [2 ** (patch_level - 1 - i) for i in range(patch_level)]  # k^2 = 4^(L-1), ..., 4, 1.
  stages, prev = [], 0
  for k, end in zip(ks, ends):
    stages.append((k, float(end - prev)))
    prev = end
  return [(k, e) for k, e in stages if e > 0]


class Schedule:
  """Which k applies at a step, and the per-stage learning rate, for one run.

  Stage boundaries are half-open step ranges [start, end): the step at a boundary already belongs to
  the next stage, both for k and for the learning rate, so a stage never borrows a step of its
  neighbour.
  """

  def __init__(
    self, stages: Sequence[tuple[int, float]], steps_per_epoch: int, grid: Sequence[int] = (16, 16)
  ):
    if steps_per_epoch <= 0:
      raise ValueError(
        f"steps_per_epoch={steps_per_epoch!r}; expected a positive integer (is the "
        "global batch larger than the data set?)"
      )
    if not stages:
      raise ValueError("the NPP schedule has no stage; expected at least one (k, epochs)")
    out, step = [], 0
    for k, epochs in stages:
      check_patch_size(k, grid)
      if epochs <= 0:
        raise ValueError(f"stage epochs={epochs!r} for k={k}; expected a positive number")
      n = int(round(epochs * steps_per_epoch))
      if n <= 0:
        raise ValueError(
          f"stage k={k} of {epochs} epochs has no step at {steps_per_epoch} steps/epoch"
        )
      out.append(Stage(k=k, start_step=step, end_step=step + n, epochs=float(epochs)))
      step += n
    if out[-1].k != 1:
      raise ValueError(
        f"the last stage has k={out[-1].k}; expected k=1 so that the final model is a "
        "plain next-token model"
      )
    self.stages = tuple(out)
    self.steps_per_epoch = steps_per_epoch
    self.grid = tuple(grid)

  @classmethod
  def from_config(cls, config, steps_per_epoch: int) -> "Schedule":
    """From `config.npp` (+ `config.train.epochs`): explicit stages if given, else the release's."""
    stages = NPPSettings.from_config(config).stages_for(config.train.epochs)
    return cls(stages, steps_per_epoch, tuple(config.model.grid))

  @property
  def total_steps(self) -> int:
    return self.stages[-1].end_step

  @property
  def total_epochs(self) -> float:
    return sum(s.epochs for s in self.stages)

  def stage_at(self, step: int) -> Stage:
    for s in self.stages:
      if step < s.end_step:
        return s
    return self.stages[-1]

  def k_at(self, step: int) -> int:
    return self.stage_at(step).k

  def learning_rate(
    self, lr: float, end_lr: float, warmup_epochs: float, decay_ratio: float
  ) -> optax.Schedule:
    """Per stage: linear warmup 0 -> lr, constant, linear decay to end_lr over the last decay_ratio.

    Warmup restarts in every stage (optimizer state carries over). The first step of a stage gets
    lr / warmup rather than 0, and the last step of a stage reaches end_lr exactly: no step is spent
    at lr = 0, and each stage's decay ends inside that stage rather than spilling into the next one.
    """
    optim.check_learning_rate(lr, end_lr, warmup_epochs, decay_ratio)
    pieces, boundaries = [], []
    for stage in self.stages:
      n = stage.num_steps
      decay = min(int(round(decay_ratio * n)), n)
      warm = min(int(round(warmup_epochs * self.steps_per_epoch)), n - decay)
      parts, cuts = [], []
      if warm > 0:
        # Step t of the warmup gets lr * (t + 1) / warm.
        parts.append(optax.linear_schedule(lr / warm, lr, max(warm - 1, 1)))
        cuts.append(warm)
      parts.append(optax.constant_schedule(lr))
      if decay > 0:
        cuts.append(n - decay)
        # Step t of the decay gets lr + (end_lr - lr) * (t + 1) / decay: the stage's last step is
        # end_lr.
        parts.append(optax.linear_schedule(lr + (end_lr - lr) / decay, end_lr, max(decay - 1, 1)))
      pieces.append(optax.join_schedules(parts, cuts) if cuts else parts[0])
      boundaries.append(stage.end_step)
    return optax.join_schedules(pieces, boundaries[:-1])

  def token_ratio(self) -> float:
    """Tokens the transformer sees over the whole schedule, relative to k = 1 for total_epochs."""
    h, w = self.grid
    n1 = h * w
    seen = sum(s.epochs * (h // s.k) * (w // s.k) for s in self.stages)
    return seen / (self.total_epochs * n1)


def num_patches(grid: Sequence[int], k: int) -> int:
  h, w = grid
  return (h // k) * (w // k)
