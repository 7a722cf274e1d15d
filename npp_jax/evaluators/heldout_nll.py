"""Held-out k = 1 NLL during training (train.eval_every_steps, the ends of the NPP stages, the last
step): a training evaluator (npp_jax.evaluators) on the code data set's held-out split."""

import functools
import time

from clu import metrics as clu_metrics
import flax
import jax
import jax.numpy as jnp

from npp_jax import data as datasets
from npp_jax import sharding
from npp_jax.models import gpt


@flax.struct.dataclass
class EvalMetrics(clu_metrics.Collection):
  """Held-out averages over the real images (clu.metrics: masked sums merged across batches)."""

  nll: clu_metrics.Average.from_output("nll")  # k = 1 NLL, nats per token.
  class_info: clu_metrics.Average.from_output("class_info")  # Null minus true NLL, nats per image.


def eval_step(params, batch: dict, *, model: gpt.GPT, num_classes: int) -> EvalMetrics:
  """k = 1 NLL with the true condition and with the null one (the null class, or the null caption
  under the caption's mask), over the batch's real rows (mask; of a caption batch, valid ones)."""
  codes = batch["codes"]
  targets = codes.reshape(codes.shape[0], -1)
  cond, kw = gpt.model_inputs(batch, model.cfg)
  mask = batch["mask"].astype(bool)
  if model.cfg.condition == "text":
    mask = mask & batch["valid"].astype(bool)
    null_cond, null_kw = cond, {**kw, "null_caption": jnp.ones(codes.shape[:1], bool)}
  else:
    null_cond, null_kw = jnp.full_like(cond, num_classes), kw

  def image_nll(c, extra):  # [B]: the sum over the image's tokens.
    logits = model.apply({"params": params}, codes, c, **extra, patch_size=1, train=False)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0].sum(-1)

  nll, null = image_nll(cond, kw), image_nll(null_cond, null_kw)
  return EvalMetrics.single_from_model_output(
    nll=nll / targets.shape[1], class_info=null - nll, mask=mask
  )


class HeldOutNLL:
  """Held-out k = 1 NLL (nats per token) and class information (null-class NLL minus true-class NLL,
  nats per image) on the first `max_batches` batches of a split, read once and kept on the host:
  every evaluation of a run sees the same images, so its curve compares like with like.

  due(step): a step of `at` (the stage ends and the last step) or a multiple of every_steps (0:
  none).
  """

  def __init__(self, model: gpt.GPT, mesh, params_sharding, data, *, at, every_steps: int):
    self.mesh, (self.path, self.split, self.batch_size, self.max_batches) = mesh, data
    self.at, self.every_steps = frozenset(at), every_steps
    self.cfg = model.cfg
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
      it = datasets.reader(self.cfg).make_eval_iterator(
        self.path,
        batch_size=self.batch_size,
        split=self.split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
      )
      self._batches = [b for _, b in zip(range(self.max_batches), it)]
    total = EvalMetrics.empty()
    for local in self._batches:
      total = total.merge(self._fn(state.params, sharding.global_batch(local, self.mesh)))
    out = jax.device_get(total.compute())
    self.seconds += time.perf_counter() - t0
    return {"eval/nll": float(out["nll"]), "eval/class_info": float(out["class_info"])}
