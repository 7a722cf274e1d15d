"""What a train step costs: FLOPs per patch size, MFU, and a whole schedule against next-token
training.

FLOPs follow the usual accounting (PaLM appendix B): 2 per multiply-add, a train step is 3x the
forward pass, attention scores and mixing counted in full (4 * S^2 * D per layer, causal mask not
discounted).
"""

import dataclasses

import jax

from npp_jax import chips
from npp_jax import npp
from npp_jax.models.gpt import GPTConfig

# Dense bf16 peak per device: npp_jax/chips.py's table (one table for MFU and --mode=compile). CPU
# has none: MFU is then not reported unless train.peak_flops_per_device says otherwise.


@dataclasses.dataclass(frozen=True)
class StepFlops:
  transformer: float  # Dense layers of all blocks.
  attention: float  # Scores and value mixing.
  logits: float  # Output projection.

  @property
  def total(self) -> float:
    return self.transformer + self.attention + self.logits


def train_step_flops(cfg: GPTConfig, k: int, batch_size: int) -> StepFlops:
  """FLOPs of one train step (forward + backward) at patch size k for a global batch."""
  seq = npp.num_patches(cfg.grid, k)  # 1 condition + n - 1 patches.
  hd = cfg.head_dim
  per_layer = (
    cfg.dim * (cfg.n_head + 2 * cfg.n_kv_head) * hd + cfg.dim * cfg.dim + 3 * cfg.dim * cfg.ffn_dim
  )
  fwd_dense = 2 * seq * per_layer * cfg.n_layer
  fwd_attn = 4 * seq * seq * cfg.dim * cfg.n_layer
  fwd_logits = 2 * seq * cfg.dim * cfg.vocab_size
  return StepFlops(
    3.0 * batch_size * fwd_dense, 3.0 * batch_size * fwd_attn, 3.0 * batch_size * fwd_logits
  )


def schedule_flop_ratio(schedule: npp.Schedule, cfg: GPTConfig) -> float:
  """FLOPs of the whole NPP schedule relative to next-token training for the same epochs."""
  per_epoch = lambda k: train_step_flops(cfg, k, 1).total
  spent = sum(s.epochs * per_epoch(s.k) for s in schedule.stages)
  return spent / (schedule.total_epochs * per_epoch(1))


def cumulative_relative_cost(schedule: npp.Schedule, cfg: GPTConfig, step: int) -> float:
  """FLOPs spent up to `step`, in units of next-token training steps (so k=1 steps count 1 each)."""
  one = train_step_flops(cfg, 1, 1).total
  spent = 0.0
  for s in schedule.stages:
    n = max(0, min(step, s.end_step) - s.start_step)
    spent += n * train_step_flops(cfg, s.k, 1).total / one
  return spent / max(step, 1)


def peak_flops_per_device(device=None, override: float = 0.0) -> float | None:
  if override > 0:
    return override
  chip = chips.chip_of_kind((device or jax.devices()[0]).device_kind)
  return chip.peak_flops if chip else None


def mfu(
  step_flops: float, step_seconds: float, num_devices: int, peak: float | None
) -> float | None:
  if not peak or step_seconds <= 0:
    return None
  return step_flops / step_seconds / (num_devices * peak)
