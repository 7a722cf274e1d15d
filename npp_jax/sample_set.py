"""Which samples a config draws: `config.sample` beyond the per-token SamplingSettings of
npp_jax.sampling. Sample i has class `classes[i % len(classes)]` and the randomness fold_in(seed,
i); samples are drawn `batch_size` at a time from the run's weights (the EMA with use_ema) in a
compute dtype, and decoded into images by the VQ at `vq_checkpoint` ("" leaves codes only).

The sampling job and the FID evaluator during training both draw through `draw`, so sample i is the
same image in both: a checkpoint scored during training scores the same with --mode=sample.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from npp_jax import rules
from npp_jax import sampling
from npp_jax import sharding
from npp_jax.models import gpt


@dataclasses.dataclass(frozen=True)
class SampleSetSettings:
  use_ema: bool
  vq_checkpoint: str
  classes: tuple  # Class ids cycled over the samples; () cycles all classes.
  seed: int
  batch_size: int  # Global samples per step (a multiple of the device count).
  dtype: str  # "auto" (float32 on CPU, model.dtype elsewhere) or a dtype name.
  sampling: sampling.SamplingSettings

  def __post_init__(self):
    rules.check_fields(self, "sample", _RULES)

  @classmethod
  def from_config(cls, config) -> "SampleSetSettings":
    fields = rules.section(
      config, "sample", cls, sampling=sampling.SamplingSettings.from_config(config)
    )
    classes = fields["classes"]
    return cls(**fields | {"classes": tuple(classes) if isinstance(classes, list) else classes})

  def check_model(self, model: gpt.GPTConfig) -> None:
    """Class ids the model has (a text model samples captions), a top_k its vocabulary allows, and
    captions exactly for a text model."""
    self.sampling.check_model(model)
    bad = [c for c in self.classes if not c < model.num_classes]
    if bad and model.condition != "text":
      raise ValueError(
        f"sample.classes holds {bad[0]!r}; expected class ids in [0, model.num_classes="
        f"{model.num_classes})"
      )
    self.sampling.check_vocab(model.vocab_size)

  def check_devices(self, num_devices: int) -> None:
    if self.batch_size % num_devices:
      raise ValueError(
        f"sample.batch_size={self.batch_size} over {num_devices} devices; expected a multiple of "
        f"{num_devices} (every device decodes the same number of samples)"
      )

  def labels(self, indices, num_classes: int) -> np.ndarray:
    """Class of each global sample index: every prefix of the run, and every batch, as balanced as
    it can be."""
    classes = np.asarray(self.classes or range(num_classes), np.int32)
    return classes[np.asarray(indices) % len(classes)]

  def sampler_model(self, model: gpt.GPTConfig) -> gpt.GPTConfig:
    """The model as the sampler runs it: unscanned layers, in the compute dtype."""
    if self.dtype == "auto":
      # GPT-B decode in bf16 measured 1.4x slower than fp32 on a 2-core CPU (benchmarks/sample.py).
      cpu = jax.devices()[0].platform == "cpu"
      dtype = jnp.float32 if cpu else model.dtype
    else:
      dtype = rules.DTYPES[self.dtype]
    return dataclasses.replace(model, scan_layers=False, dtype=dtype)


_CLASSES = (
  "a tuple of class ids (integers >= 0); () for every class",
  lambda v: isinstance(v, tuple) and all(rules.is_int(c) and c >= 0 for c in v),
)
_RULES = {
  "use_ema": rules.BOOL,
  "vq_checkpoint": rules.TEXT,
  "classes": _CLASSES,
  "seed": rules.INT,
  "batch_size": rules.POSITIVE_INT,
  "dtype": rules.one_of("auto", *rules.DTYPE_NAMES),
}


def draw(sampler: sampling.Sampler, params, vq_params, start: int, stop: int, s, vq_cfg):
  """Samples start .. stop - 1 (stop - start <= batch_size) on every device of the sampler's mesh:
  {"codes", "labels"} and, with vq_params, "arr_0" (uint8 images), every process holding all of
  them.

  params: as sampler.place_params returns them; the batch is padded to batch_size, so every call has
  one shape.
  """
  model = sampler.model
  labels = s.labels(np.arange(start, start + s.batch_size), model.num_classes)
  rng = sharding.put(jax.random.key(int(s.seed)), sharding.replicated(sampler.mesh))
  codes = sampler.sample(params, labels, rng, first_index=start)
  out = {"codes": sharding.gather(codes)[: stop - start], "labels": labels[: stop - start]}
  if vq_params is not None:
    out["arr_0"] = sampling.decode_images(vq_params, out["codes"], vq_cfg, sampler.mesh)
  return out
