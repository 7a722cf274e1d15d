"""The optimizer of both trainers (GPT and VQ): AdamW as the release configures it, and the GPT
trainer's `optim` section (`OptimSettings`).

Weight decay goes by parameter NAME, not by rank: the release decays the >= 2-D weights of its
(unscanned) models, i.e. kernels and embeddings, never norm scales or biases. A rank test breaks
under `model.scan_layers`, where the RMSNorm scales are stacked to [n_layer, D]; the name does not
change.

Frozen leaves (the null caption of a text model, a fixed tensor the release keeps as a buffer) get
an update of exactly zero, whatever the optimizer's state says; the wrapper adds no state, so the
optimizer state of a model without frozen leaves is the same tree as before.
"""

import dataclasses

import jax
import optax

from npp_jax import rules

# Leaf names that take weight decay: Dense/Conv kernels and embedding tables (token, class,
# codebook).
DECAYED = ("kernel", "embedding")
# Leaf names that are never trained: the text model's null caption (models/gpt.py CaptionEmbedder).
FROZEN = ("uncond_embedding",)


def _leaf_name(path) -> str:
  # The last dict key: boxed (logically partitioned) leaves add an attribute key after it.
  names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
  return str(names[-1]) if names else ""


def decay_mask(params):
  """A tree of bools like `params` (boxed or not): True where weight decay applies."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in DECAYED, params)


def frozen_mask(params):
  """A tree of bools like `params`: True at the leaves that are never trained."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in FROZEN, params)


def keep_frozen(new, old):
  """`new` with its frozen leaves taken from `old` (an EMA must not round a fixed tensor either)."""
  return jax.tree.map(lambda f, n, o: o if f else n, frozen_mask(new), new, old)


def without_frozen_updates(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` with the updates of frozen leaves replaced by zeros; same state as `inner`."""

  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    zeros = jax.tree.map(jax.numpy.zeros_like, updates)
    return keep_frozen(updates, zeros), state

  return optax.GradientTransformation(inner.init, update)


def adamw(
  learning_rate,
  *,
  b1: float,
  b2: float,
  weight_decay: float,
  grad_clip: float = 0.0,
  eps: float = 1e-8,
) -> optax.GradientTransformation:
  """Global-norm clipping (0 = off), then AdamW with decoupled decay on kernels and embeddings only;
  frozen leaves (FROZEN) get zero updates.

  learning_rate: a float or an optax schedule (step -> rate).
  """
  return without_frozen_updates(
    optax.chain(
      optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity(),
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask),
    )
  )


@dataclasses.dataclass(frozen=True)
class OptimSettings:
  """config.optim: AdamW, the per-stage learning rate (npp.Schedule.learning_rate) and the EMA."""

  lr: float
  end_lr: float
  weight_decay: float  # Only on kernels and embeddings (decay_mask).
  b1: float
  b2: float
  eps: float
  grad_clip: float  # Global-norm clip; 0 turns it off.
  warmup_epochs: float
  decay_ratio: float
  ema_decay: float  # 0 keeps no EMA.

  def __post_init__(self):
    rules.check_fields(self, "optim", _OPTIM_RULES)
    check_learning_rate(self.lr, self.end_lr, self.warmup_epochs, self.decay_ratio)

  @classmethod
  def from_config(cls, config) -> "OptimSettings":
    return cls(**rules.section(config, "optim", cls))

  def adamw(self, learning_rate) -> optax.GradientTransformation:
    return adamw(
      learning_rate,
      b1=self.b1,
      b2=self.b2,
      eps=self.eps,
      weight_decay=self.weight_decay,
      grad_clip=self.grad_clip,
    )


_OPTIM_RULES = {
  "weight_decay": rules.NON_NEGATIVE,
  "b1": rules.FRACTION,
  "b2": rules.FRACTION,
  "eps": rules.POSITIVE,
  "grad_clip": rules.NON_NEGATIVE,
  "ema_decay": rules.FRACTION,
}


def check_learning_rate(lr, end_lr, warmup_epochs, decay_ratio) -> None:
  """The learning-rate knobs of optim (also what npp.Schedule.learning_rate takes directly)."""
  rules.check("optim.lr", lr, rules.POSITIVE)
  rules.check(
    "optim.end_lr",
    end_lr,
    (f"a number in [0, optim.lr={lr}]", lambda v: rules.is_num(v) and 0 <= v <= lr),
  )
  rules.check("optim.warmup_epochs", warmup_epochs, rules.NON_NEGATIVE)
  rules.check("optim.decay_ratio", decay_ratio, rules.CLOSED_FRACTION)
