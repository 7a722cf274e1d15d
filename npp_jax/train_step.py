"""The GPT train state and one optimizer step: what the training job compiles per patch size k, and
what --mode=compile and the benchmarks compile without running the job (a library, so no job imports
another job).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from npp_jax import npp
from npp_jax import optim
from npp_jax.models import gpt


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any  # () when the EMA is off, so it costs no memory.
  rng: jax.Array  # Raw uint32 key data: checkpointable as a plain array.


def make_optimizer(config, schedule: npp.Schedule) -> tuple[optax.GradientTransformation, Any]:
  """(AdamW of optim.py, the per-step learning rate of the NPP schedule)."""
  o = config.optim
  lr = schedule.learning_rate(o.lr, o.end_lr, o.warmup_epochs, o.decay_ratio)
  tx = optim.adamw(
    lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay, grad_clip=o.grad_clip
  )
  return tx, lr


def init_state(model: gpt.GPT, tx, cfg: gpt.GPTConfig, seed: int, ema: bool):
  """A fresh TrainState with boxed (logically partitioned) leaves, so eval_shape yields its
  layout."""

  def init(rng):
    params = model.init(rng, *gpt.example_inputs(cfg, zeros=True))["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      ema=params if ema else (),
      rng=jax.random.key_data(jax.random.fold_in(rng, 1)),
    )

  return init, jax.random.key(seed)


# The batch entries a train step reads, per model.condition (data/code_dataset.py,
# data/captions.py).
BATCH_KEYS = {"class": ("codes", "labels"), "text": ("codes", "caption", "caption_len", "valid")}


def train_step(
  state: TrainState,
  batch: dict,
  *,
  model: gpt.GPT,
  tx,
  lr_fn,
  k: int,
  accum: int,
  ema_decay: float = 0.0,
):
  """One optimizer step on a global batch, accumulating `accum` micro-batches; returns (state,
  metrics).

  A caption batch's invalid examples (unreadable images) are left out of the loss: it is the mean
  over the valid examples of the whole global batch, whichever micro-batch holds them."""
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  inputs = {key: batch[key] for key in BATCH_KEYS[model.cfg.condition]}
  num_valid = jnp.maximum(inputs["valid"].sum(), 1) if "valid" in inputs else None

  def loss_fn(params, micro, rng):
    codes = micro["codes"]
    cond, kw = gpt.model_inputs(micro, model.cfg)
    logits = model.apply(
      {"params": params}, codes, cond, **kw, patch_size=k, train=True, rngs={"dropout": rng}
    )
    targets = npp.group_targets(codes, k)
    if num_valid is None:
      return npp.patch_loss(logits, targets)
    valid = micro["valid"]
    loss = npp.patch_loss(logits, targets, jnp.broadcast_to(valid[:, None], logits.shape[:2]))
    # The micro-batch's share of the valid examples (times accum, which the mean below divides out).
    return loss * (valid.sum() * accum / num_valid)

  grad_fn = jax.value_and_grad(loss_fn)
  if accum == 1:
    loss, grads = grad_fn(state.params, inputs, rng)
  else:
    # Micro-batch i takes rows i, i + accum, ...: every device keeps an equal share of each
    # micro-batch.
    split = lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    micro = (jax.tree.map(split, inputs), jnp.arange(accum))

    def body(carry, xs):
      m, i = xs
      loss, grads = grad_fn(state.params, m, jax.random.fold_in(rng, i))
      return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(body, zeros, micro)
    loss, grads = jax.tree.map(lambda x: x / accum, (loss, grads))

  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema_decay > 0:
    ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, ema, params)
    ema = optim.keep_frozen(ema, params)  # A fixed tensor (the null caption) stays bit-exact.
  metrics = {
    "loss": loss,
    "grad_norm": optax.global_norm(grads),
    "param_norm": optax.global_norm(params),
    "lr": lr_fn(state.step),
  }
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema), metrics
