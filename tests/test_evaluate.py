"""--mode=evaluate through the real command line: metrics, statistics files, resume, references, bad
inputs.

Inception runs at its smallest input (evaluate.resize_to=75) on random weights: the architecture and
the formulas are what is tested here (parity at 299 px: test_inception.py).
"""

import json

import jax
import numpy as np
import pytest
from support import cli
from support.weights import random_vq_params

from npp_jax import convert
from npp_jax import sharding
from npp_jax.fid import features
from npp_jax.fid import metrics
from npp_jax.fid import scores as fid_scores
from npp_jax.models import inception

torch = pytest.importorskip("torch")
from support.weights import random_inception_state  # noqa: E402

SIZE = 75


def run_main(workdir, **fields):
  args = [
    "--mode=evaluate",
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.evaluate.resize_to={SIZE}",
    "--config.evaluate.batch_size=8",
    "--config.evaluate.fid_method=eigh",
  ]
  args += [f"--config.evaluate.{k}={v}" for k, v in fields.items()]
  return cli.run_main(*args, timeout=600)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("evaluate")
  state = random_inception_state(seed=3)
  weights = d / inception.WEIGHTS_FILE
  torch.save(state, str(weights))
  from npp_jax.data import digits
  from npp_jax.data import images

  # Real digits against real digits (the test split is the reference): neighbours exist both ways;
  # the last five are noise, which precision must count as off the reference's manifold.
  samples = images.float_to_uint8(digits.load_digits("train")[0][:20])
  samples[15:] = np.random.default_rng(0).integers(
    0, 256, samples[15:].shape
  )  # Off the digits' manifold.
  np.savez(d / "samples.npz", arr_0=samples)
  bad_state = dict(state, **{"fc.weight": torch.zeros(1000, 2048)})
  torch.save(bad_state, str(d / "wrong_shape.pth"))
  np.savez(d / "no_arr0.npz", images=samples)
  np.savez(d / "float.npz", arr_0=samples.astype(np.float32))
  np.savez(d / "grey.npz", arr_0=samples[..., :1])
  np.savez(d / "three.npz", arr_0=samples[:3])
  params = convert.inception_state_to_params({k: v.numpy() for k, v in state.items()})
  return {
    "dir": d,
    "weights": str(weights),
    "samples": str(d / "samples.npz"),
    "params": params,
    "images": samples,
  }


def features_here(params, images):
  """The same features on one device, in this process."""
  mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), devices=jax.devices()[:1])
  fn = features.feature_fn(mesh, "adm", SIZE)
  pool3, spatial = fn(params, jax.device_put(images, sharding.data_sharding(mesh)))
  return np.asarray(pool3), np.asarray(spatial)


def low_rank_frechet(x, y):
  """FID from the features themselves, by another route than the job's: with A, B the centred
  features, tr sqrt(S1 S2) is the nuclear norm of B A^T / sqrt((n - 1)(m - 1)), an SVD of an [m, n]
  matrix."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  a, b = x - x.mean(0), y - y.mean(0)
  (n, m) = len(x), len(y)
  trace_sqrt = np.linalg.svd(b @ a.T, compute_uv=False).sum() / np.sqrt((n - 1) * (m - 1))
  return (
    np.sum((x.mean(0) - y.mean(0)) ** 2)
    + (a * a).sum() / (n - 1)
    + (b * b).sum() / (m - 1)
    - 2 * trace_sqrt
  )


def test_evaluate_end_to_end_then_resume_with_an_adm_reference(files, tmp_path):
  from npp_jax.data import digits
  from npp_jax.data import images

  work = tmp_path / "run"
  out = run_main(
    work,
    samples=files["samples"],
    reference="digits",
    reference_split="test",
    reference_num_images=24,
    image_size=32,
    inception=files["weights"],
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((work / "metrics.json").read_text())
  assert result["num_samples"] == 20 and result["num_reference"] == 24
  # Features over 8 devices in the CLI equal one device's here; the numbers follow from them.
  pool3, spatial = features_here(files["params"], files["images"])
  with np.load(work / "sample_stats.npz") as z:
    np.testing.assert_allclose(z["pool3"], pool3, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(z["mu_s"], spatial.astype(np.float64).mean(0), rtol=1e-4, atol=1e-5)
    assert z["sigma"].shape == (2048, 2048) and z["sigma_s"].shape == (
      63,
      63,
    )  # 7 x 3 x 3 at 75 px.
  ref_images = images.float_to_uint8(digits.load_digits("test")[0][:24])
  ref_pool3, ref_spatial = features_here(files["params"], ref_images)
  np.testing.assert_allclose(result["fid"], low_rank_frechet(pool3, ref_pool3), rtol=1e-3)
  np.testing.assert_allclose(result["sfid"], low_rank_frechet(spatial, ref_spatial), rtol=1e-3)
  assert result["fid"] > 0 and result["sfid"] > 0
  want_is = metrics.inception_score(metrics.inception_probs(pool3, files["params"]["fc"]["kernel"]))
  np.testing.assert_allclose(result["inception_score"], want_is, rtol=1e-4)
  # Features agree to ~1e-6, so at most a borderline neighbour may differ: one image in 20 or 24.
  want_pr = metrics.precision_recall(ref_pool3, pool3)
  assert result["precision"] == pytest.approx(want_pr[0], abs=0.051)
  assert result["recall"] == pytest.approx(want_pr[1], abs=0.042)
  assert 0 < result["precision"] < 1 and result["recall"] > 0, result  # Neither trivially 0 nor 1.
  assert (work / "reference_stats.npz").exists() and (work / "inception").is_dir()
  from support.scalars import read_scalars

  assert read_scalars(str(work))["eval/fid"][0][1] == pytest.approx(result["fid"], rel=1e-5)

  # An ADM reference batch: images for precision / recall, the file's mu and sigma for FID and sFID.
  adm = files["dir"] / "adm_ref.npz"
  with np.load(work / "reference_stats.npz") as z:
    np.savez(adm, arr_0=files["images"][::-1].copy(), **{k: z[k] for k in fid_scores.STATS_KEYS})
  out = run_main(work, samples=files["samples"], reference=adm, inception=work / "inception")
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resuming: features of 20 of 20 samples" in out.stderr
  again = json.loads((work / "metrics.json").read_text())
  assert again["fid"] == pytest.approx(
    result["fid"], rel=1e-9
  )  # The file's statistics, not its images'.
  assert again["precision"] == again["recall"] == 1.0  # The same images, reversed.


def test_a_statistics_file_is_a_reference(files, tmp_path):
  """sample_stats.npz of a run scores its own samples: FID 0, and its pool3 gives precision /
  recall."""
  pool3, spatial = features_here(files["params"], files["images"])
  stats = files["dir"] / "own_stats.npz"
  mu, sigma = metrics.statistics(pool3)
  mu_s, sigma_s = metrics.statistics(spatial)
  np.savez(
    stats,
    mu=mu,
    sigma=sigma,
    mu_s=mu_s,
    sigma_s=sigma_s,
    pool3=pool3,
    preprocess=np.array("adm"),
    resize_to=np.array(SIZE),
  )
  e = _config().evaluate
  e.reference = str(stats)
  ref = fid_scores.open_reference(e)
  assert ref.images is None and ref.pool3.shape == (20, 2048)
  np.testing.assert_array_equal(ref.stats["sigma_s"], sigma_s)
  # (FID of a set with itself: test_metrics.py, on smaller features; a 2048-d one costs ~20 s of
  # CPU.)
  scores = fid_scores.score_stats(
    e,
    files["params"],
    pool3,
    {"mu": mu_s[:4], "sigma": sigma_s[:4, :4], "mu_s": mu_s, "sigma_s": sigma_s},
    {
      "mu": mu_s[:4],
      "sigma": sigma_s[:4, :4],
      "mu_s": ref.stats["mu_s"],
      "sigma_s": ref.stats["sigma_s"],
    },
    ref.pool3,
  )
  assert abs(scores["sfid"]) < 1e-6 * np.trace(
    sigma_s
  )  # sqrt of round-off eigenvalues of a rank-19 sigma.
  assert scores["precision"] == scores["recall"] == 1.0
  e.preprocess = "pytorch_fid"
  with pytest.raises(ValueError, match="computed with preprocess='adm'"):
    fid_scores.open_reference(e)


def _config():
  from npp_jax import config_lib

  c = config_lib.load("configs/tiny.py")
  c.evaluate.resize_to, c.evaluate.fid_method = SIZE, "eigh"
  return c


@pytest.mark.parametrize(
  "case, message",
  [
    (
      "missing_weights",
      f"does not exist; expected pytorch-fid's {inception.WEIGHTS_FILE} (from "
      "https://github.com/mseitzer/pytorch-fid/releases",
    ),
    ("wrong_shape", "mis-shaped, e.g. fc.weight [1000, 2048] (expected [1008, 2048])"),
    ("no_arr0", "has no arr_0 (its arrays: ['images']); expected the ADM sample format"),
    ("float", "arr_0 holds float32 pixels; expected uint8 [N, H, W, 3]"),
    ("grey", "arr_0 has shape [20, 32, 32, 1]; expected uint8 [N, H, W, 3]"),
    ("three", "holds 3 images; expected at least 4"),
  ],
)
def test_bad_inputs_are_one_line_errors_and_write_nothing(files, tmp_path, case, message):
  d = files["dir"]
  fields = {
    "samples": files["samples"],
    "reference": files["samples"],
    "inception": files["weights"],
  }
  if case == "missing_weights":
    fields["inception"] = d / "nowhere" / inception.WEIGHTS_FILE
  elif case == "wrong_shape":
    fields["inception"] = d / "wrong_shape.pth"
  else:
    fields["samples"] = d / f"{case}.npz"
  work = tmp_path / "run"
  out = run_main(work, **fields)
  assert out.returncode != 0
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith("error:") and message in last, out.stderr[-2000:]
  assert not work.exists()


def test_sample_mode_scores_what_it_wrote(files, tmp_path):
  """--mode=sample with evaluate.reference set: samples, then scores them; bad scoring inputs stop
  it before the first sample."""
  from support.configs import tiny_model_config
  from support.weights import random_params

  from npp_jax import checkpoints
  from npp_jax import config_lib
  from npp_jax.models import gpt
  from npp_jax.models import vq

  model = tiny_model_config()  # 8x8 codes of 64; the VQ below decodes them to 16 px images.
  checkpoints.save_params(tmp_path / "gpt", random_params(gpt.GPTConfig.from_config(model))[1])
  v = config_lib.vq_config()
  v.codebook_size, v.ch, v.ch_mult, v.z_channels, v.num_res_blocks, v.image_size = (
    64,
    32,
    (1, 1),
    32,
    1,
    16,
  )
  checkpoints.save_params(tmp_path / "vq", random_vq_params(vq.VQConfig.from_config(v), 0))
  overrides = {
    f"model.{k}": model[k]
    for k in ("n_layer", "n_head", "dim", "vocab_size", "num_classes", "multiple_of", "grid")
  }
  overrides.update(
    {
      f"vq.{k}": v[k]
      for k in ("codebook_size", "ch", "ch_mult", "z_channels", "num_res_blocks", "image_size")
    }
  )
  overrides.update(
    {
      "sample.checkpoint": tmp_path / "gpt",
      "sample.vq_checkpoint": tmp_path / "vq",
      "sample.num_images": 8,
      "sample.batch_size": 8,
      "evaluate.reference": files["samples"],
      "evaluate.resize_to": SIZE,
      "evaluate.batch_size": 8,
      "evaluate.fid_method": "eigh",
    }
  )

  def run(workdir, **more):
    fields = dict(overrides, **more)
    args = [f"--config.{k}={str(x).replace(' ', '')}" for k, x in fields.items()]
    return cli.run_main(
      "--mode=sample", "--config=configs/tiny.py", f"--workdir={workdir}", *args, timeout=600
    )

  out = run(tmp_path / "bad", **{"evaluate.inception": tmp_path / inception.WEIGHTS_FILE})
  assert out.returncode != 0 and "error: evaluate.inception=" in out.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "bad").exists()  # Refused before the first sample.

  work = tmp_path / "run"
  out = run(work, **{"evaluate.inception": files["weights"]})
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((work / "metrics.json").read_text())
  assert result["num_samples"] == 8 and result["samples"].endswith("samples/samples_8.npz")
  with np.load(work / "samples" / "samples_8.npz") as z:
    images = z["arr_0"]
  assert images.shape == (8, 16, 16, 3)
  pool3, _ = features_here(files["params"], images)
  with np.load(work / "sample_stats.npz") as z:
    np.testing.assert_allclose(z["pool3"], pool3, rtol=1e-4, atol=1e-5)  # The images it wrote.
  assert result["fid"] > 0 and result["inception_score"] >= 1.0
