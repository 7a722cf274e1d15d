"""Sample metrics during training (evaluate.every_steps) through the real command line: eval/fid and
the others land at the expected steps, and the last one equals what --mode=sample + scoring computes
from the final checkpoint's samples (the same images: same settings, same seed).

Inception runs at its smallest input (75 px) on random weights, as in test_evaluate.py.
"""

import json
import os

import numpy as np
import pytest
from support import cli
from support.weights import random_vq_params

from npp_jax import checkpoints
from npp_jax import config_lib
from npp_jax.data import code_dataset
from npp_jax.models import inception
from npp_jax.models import vq

torch = pytest.importorskip("torch")
from support.configs import tiny_model_config  # noqa: E402
from support.scalars import read_scalars  # noqa: E402
from support.weights import random_inception_state  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  d = tmp_path_factory.mktemp("sample_metrics")
  torch.save(random_inception_state(seed=3), str(d / inception.WEIGHTS_FILE))
  model = tiny_model_config()  # 8x8 codes of 64, 10 classes; the VQ below decodes them to 16 px.
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 64).astype(np.int32)
  codes = ((labels[:, None, None, None] * 7 + rng.integers(0, 3, (64, 1, 8, 8))) % 64).astype(
    np.int32
  )
  code_dataset.write_code_dataset(str(d / "codes"), codes, labels, vocab_size=64, num_classes=10)
  v = config_lib.vq_config()
  v.codebook_size, v.ch, v.ch_mult, v.z_channels, v.num_res_blocks, v.image_size = (
    64,
    32,
    (1, 1),
    32,
    1,
    16,
  )
  checkpoints.save_params(d / "vq", random_vq_params(vq.VQConfig.from_config(v), 0))
  fields = {
    f"model.{k}": model[k]
    for k in ("n_layer", "n_head", "dim", "vocab_size", "num_classes", "multiple_of", "grid")
  }
  fields.update(
    {
      f"vq.{k}": v[k]
      for k in ("codebook_size", "ch", "ch_mult", "z_channels", "num_res_blocks", "image_size")
    }
  )
  fields.update(
    {
      "sample.vq_checkpoint": d / "vq",
      "sample.batch_size": 8,
      "sample.cfg_scale": 1.5,
      "evaluate.reference": "digits",
      "evaluate.reference_split": "test",
      "evaluate.reference_num_images": 24,
      "evaluate.image_size": 16,
      "evaluate.inception": d / inception.WEIGHTS_FILE,
      "evaluate.resize_to": 75,
      "evaluate.batch_size": 8,
      "evaluate.fid_method": "eigh",
    }
  )
  return d, fields


def run_main(mode, workdir, fields):
  args = [f"--config.{k}={str(x).replace(' ', '')}" for k, x in fields.items()]
  return cli.run_main(
    f"--mode={mode}", "--config=configs/tiny.py", f"--workdir={workdir}", *args, timeout=600
  )


def test_training_logs_sample_metrics_equal_to_sample_mode(inputs, tmp_path):
  d, fields = inputs
  work = tmp_path / "train"
  train = dict(
    fields,
    **{
      "data.path": d / "codes",
      "train.max_steps": 3,
      "train.checkpoint_every_steps": 3,
      "evaluate.every_steps": 2,
      "evaluate.num_samples": 12,
    },
  )
  out = run_main("train", work, train)
  assert out.returncode == 0, out.stderr[-3000:]
  scalars = read_scalars(str(work))
  for name in ("fid", "sfid", "inception_score", "precision", "recall", "relative_cost"):
    assert [s for s, _ in scalars[f"eval/{name}"]] == [2, 3], (name, scalars[f"eval/{name}"])
  fids = [v for _, v in scalars["eval/fid"]]
  assert all(f > 0 for f in fids) and len(set(fids)) == 2, (
    fids
  )  # The model changes between evaluations.
  costs = dict(scalars["relative_cost"])  # The training log's cost at the same step.
  assert [v for _, v in scalars["eval/relative_cost"]] == pytest.approx([costs[2], costs[3]])
  # Samples and their features stay in memory: only the reference's features are cached.
  assert not (work / "samples").exists() and not (work / "sample_stats.npz").exists()
  assert {p.parent.name.split("-")[0] for p in work.glob("evaluate/*/shard_*")} == {"reference"}

  # The final checkpoint sampled by --mode=sample with the same settings, scored: the same FID.
  again = tmp_path / "sample"
  out = run_main(
    "sample", again, dict(fields, **{"sample.checkpoint": work, "sample.num_images": 12})
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((again / "metrics.json").read_text())
  for name in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert scalars[f"eval/{name}"][-1][1] == pytest.approx(result[name], rel=1e-4, abs=1e-6), name


def test_bad_sample_metrics_inputs_fail_before_training(inputs, tmp_path):
  d, fields = inputs
  work = tmp_path / "bad"
  bad = dict(
    fields, **{"data.path": d / "codes", "evaluate.every_steps": 2, "evaluate.num_samples": 3}
  )
  out = run_main("train", work, bad)
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode != 0 and last.startswith(
    "error: evaluate.num_samples=3 with evaluate.every_steps=2; expected at least 4"
  ), out.stderr[-2000:]
  assert not work.exists()


@pytest.mark.parametrize(
  "overrides, fragment",
  [
    ({"evaluate.every_steps": -1}, "evaluate.every_steps=-1; expected an integer >= 0"),
    ({"sample.vq_checkpoint": ""}, "evaluate.every_steps is set but sample.vq_checkpoint is empty"),
    ({"evaluate.reference": ""}, "evaluate.every_steps is set but evaluate.reference is empty"),
    (
      {"evaluate.inception": "/nowhere.pth"},
      "evaluate.inception='/nowhere.pth' does not exist while",
    ),
    (
      {"sample.use_ema": True},
      "sample.use_ema=True with evaluate.every_steps set, but optim.ema_decay=0",
    ),
    ({"sample.batch_size": 12}, "sample.batch_size=12 over 8 devices"),
    ({"evaluate.batch_size": 12}, "evaluate.batch_size=12"),
    ({"sample.cfg_scale": 0.5}, "sample.cfg_scale=0.5"),
  ],
)
def test_preflight_checks_the_fields_it_adds(inputs, tmp_path, overrides, fragment):
  """Each field sampling during training reads, refused by the training job's check before jax
  compiles."""
  from npp_jax import jobs
  from npp_jax.jobs import train

  d, fields = inputs
  config = config_lib.load("configs/tiny.py")
  config.update_from_flattened_dict(
    {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in fields.items()}
  )
  config.update_from_flattened_dict(
    {
      "data.path": str(d / "codes"),
      "evaluate.every_steps": 2,
      "evaluate.num_samples": 8,
      **overrides,
    }
  )
  with pytest.raises(ValueError) as error:
    train.check(config, str(tmp_path / "run"), jobs.Topology(num_devices=8, process_count=1))
  assert fragment in str(error.value) and "\n" not in str(error.value), str(error.value)
