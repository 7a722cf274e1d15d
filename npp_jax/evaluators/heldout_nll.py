"""Held-out k = 1 NLL during training (train.eval_every_steps, the ends of the NPP stages, the last
step): a training evaluator (npp_jax.evaluators) on the code data set's held-out split."""

import functools
import time

import jax
import jax.numpy as jnp

from npp_jax import sharding
from npp_jax.data import code_dataset
from npp_jax.models import gpt


def eval_step(params, batch: dict, *, model: gpt.GPT, num_classes: int) -> dict:
  """Sums over the batch's real rows (mask): k = 1 NLL in nats per image, with the true and the null
  class."""
  codes, mask = batch["codes"], batch["mask"].astype(jnp.float32)
  targets = codes.reshape(codes.shape[0], -1)

  def image_nll(labels):  # [B]: the sum over the image's tokens.
    logits = model.apply({"params": params}, codes, labels, patch_size=1, train=False)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].sum(-1)

  cond = image_nll(batch["labels"])
  null = image_nll(jnp.full_like(batch["labels"], num_classes))
  return {"nll": jnp.sum(cond * mask), "null_nll": jnp.sum(null * mask), "images": jnp.sum(mask)}


class HeldOutNLL:
  """Held-out k = 1 NLL (nats per token) and class information (null-class NLL minus true-class NLL,
  nats per image) on the first `max_batches` batches of a split, read once and kept on the host:
  every evaluation of a run sees the same images, so its curve compares like with like.

  due(step): a step of `at` (the stage ends and the last step) or a multiple of every_steps (0: none).
  """

  def __init__(self, model: gpt.GPT, mesh, params_sharding, data, *, at, every_steps: int):
    self.mesh, (self.path, self.split, self.batch_size, self.max_batches) = mesh, data
    self.at, self.every_steps = frozenset(at), every_steps
    self.tokens = model.cfg.grid[0] * model.cfg.grid[1]
    self.seconds = 0.0
    self._batches = None
    self._fn = jax.jit(
      functools.partial(eval_step, model=model, num_classes=model.cfg.num_classes),
      in_shardings=(params_sharding, sharding.data_sharding(mesh)),
    )

  def due(self, step: int) -> bool:
    return step in self.at or bool(self.every_steps and step % self.every_steps == 0)

  def __call__(self, state, step: int) -> dict[str, float]:
    del step  # The same batches every time.
    t0 = time.perf_counter()
    if self._batches is None:
      it = code_dataset.make_eval_iterator(
        self.path,
        batch_size=self.batch_size,
        split=self.split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
      self._batches = [b for _, b in zip(range(self.max_batches), it)]
    sums = {"nll": 0.0, "null_nll": 0.0, "images": 0.0}
    for local in self._batches:
      out = jax.device_get(self._fn(state.params, sharding.global_batch(local, self.mesh)))
      for key in sums:
        sums[key] += float(out[key])
    self.seconds += time.perf_counter() - t0
    return {
      "eval/nll": sums["nll"] / (sums["images"] * self.tokens),
      "eval/class_info": (sums["null_nll"] - sums["nll"]) / sums["images"],
    }
