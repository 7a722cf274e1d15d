"""`python -m npp_jax.main --mode=evaluate`: FID, sFID, IS, precision and recall of a batch of
samples.

  python -m npp_jax.main --mode=evaluate --config=configs/b.py --workdir=DIR \
      --config.evaluate.samples=DIR/samples/samples_50000.npz \
      --config.evaluate.reference=VIRTUAL_imagenet256_labeled.npz \
      --config.evaluate.inception=pt_inception-2015-12-05-6726825d.pth

Samples are an ADM-format npz (`arr_0`: uint8 [N, H, W, 3], what --mode=sample writes). The
reference is
  * an ADM reference batch (`arr_0` images, and usually `mu`, `sigma`, `mu_s`, `sigma_s`: as the ADM
    evaluator does, the file's statistics are used for FID / sFID and its images' features for
    precision and recall),
  * a statistics file this mode wrote (`sample_stats.npz`, `reference_stats.npz`), or
  * a data set (`open_images`: "digits", a TFDS name or directory, an image folder), centre-cropped
  to
    evaluate.image_size as ADM made its reference batches; its statistics are cached in
    WORKDIR/reference_stats.npz and serve as a reference later.
Features are computed over all devices in global batches of evaluate.batch_size, one shard file per
batch under WORKDIR/evaluate/, so a killed run resumes. Outputs: WORKDIR/metrics.json,
WORKDIR/sample_stats.npz (mu, sigma, mu_s, sigma_s, and the pool3 features for precision and recall)
and TensorBoard scalars.
"""

import dataclasses

from etils import epath
import ml_collections

from npp_jax import jobs
from npp_jax import preflight
from npp_jax import rules
from npp_jax import sharding
from npp_jax.fid import images as image_sets
from npp_jax.fid import scores

SECTIONS = ("evaluate", "mesh")


@dataclasses.dataclass(frozen=True)
class EvaluateSettings:
  """The job's own `evaluate` fields beside the scoring knobs (fid.scores.ScoreSettings)."""

  samples: str  # The ADM npz to score.
  num_samples: int  # 0: all of its images; n: the first n.
  score: scores.ScoreSettings

  def __post_init__(self):
    rules.check("evaluate.samples", self.samples, rules.TEXT)
    rules.check("evaluate.num_samples", self.num_samples, _NUM_SAMPLES)

  @classmethod
  def from_config(cls, config) -> "EvaluateSettings":
    return cls(
      rules.get(config, "evaluate.samples"),
      rules.get(config, "evaluate.num_samples"),
      scores.ScoreSettings.from_config(config),
    )


_NUM_SAMPLES = ("0 (all) or a positive integer", rules.COUNT[1])


@dataclasses.dataclass(frozen=True)
class Plan:
  settings: EvaluateSettings
  samples: image_sets.NpzImages


def check_settings(config, topology: jobs.Topology) -> EvaluateSettings:
  s = EvaluateSettings.from_config(config)
  sharding.check_batch(
    s.score.batch_size,
    sharding.MeshSettings.from_config(config),
    "evaluate.batch_size",
    num_devices=topology.num_devices,
    process_count=topology.process_count,
  )
  return s


def check(config, workdir, topology: jobs.Topology) -> Plan:
  """Every field, the workdir and the samples' npz header; the reference and the weights are opened
  by run, still before it writes anything (their checks read arrays and weights)."""
  preflight.check_workdir(workdir)
  s = check_settings(config, topology)
  samples = open_samples(s)
  s.score.check_count(samples.num, f"evaluate.samples={s.samples!r}")
  return Plan(s, samples)


def open_samples(s: EvaluateSettings) -> image_sets.NpzImages:
  field = "evaluate.samples"
  if not s.samples:
    raise ValueError(
      f"{field} is empty; expected an npz of uint8 images arr_0 [N, H, W, 3] (what "
      "--mode=sample writes to WORKDIR/samples/samples_N.npz)"
    )
  path = epath.Path(s.samples)
  if not path.is_file():
    raise ValueError(f"{field}={s.samples!r} does not exist; expected an npz of uint8 images arr_0")
  members = image_sets.npz_members(path, field)
  if "arr_0" not in members:
    raise ValueError(
      f"{field}={s.samples!r} has no arr_0 (its arrays: {sorted(members)}); expected the "
      "ADM sample format, arr_0: uint8 [N, H, W, 3]"
    )
  images = image_sets.open_npz_images(path, field)
  if s.num_samples:
    if s.num_samples > images.num:
      raise ValueError(
        f"evaluate.num_samples={s.num_samples} but {s.samples} holds {images.num} images; "
        "expected at most that many (0 takes all)"
      )
    images = dataclasses.replace(images, shape=(int(s.num_samples), *images.shape[1:]))
  return images


def run(config: ml_collections.ConfigDict, workdir: str, step: int = 0) -> jobs.Result:
  """Scores config.evaluate.samples against config.evaluate.reference (fid.scores.evaluate);
  outputs: the metrics.json dict. `step` is the TensorBoard step of the numbers (0 standalone)."""
  plan = check(config, workdir, jobs.Topology.current())
  inputs = scores.load_inputs(plan.settings.score)
  mesh = sharding.make_mesh(config.mesh)
  result = scores.evaluate(plan.samples, inputs, plan.settings.score, mesh, workdir, step)
  return jobs.Result(outputs=result)
