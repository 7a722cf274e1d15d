"""metrics.py against plain NumPy / SciPy references written here, on random features."""

import numpy as np
import pytest
import scipy.stats

from npp_jax.fid import metrics


def gaussian_features(seed, n, d, shift=0.0):
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(d, d)) / np.sqrt(d)
  return (rng.normal(size=(n, d)) @ mix + shift).astype(np.float32)


def reference_frechet(mu1, s1, mu2, s2):
  """tr sqrt(S1 S2) through the symmetric form sqrt(S1) S2 sqrt(S1): no general matrix square
  root."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
  return (
    np.sum((mu1 - mu2) ** 2)
    + np.trace(s1)
    + np.trace(s2)
    - 2 * np.sum(np.sqrt(np.clip(eig, 0, None)))
  )


def test_statistics_match_numpy_cov_over_chunks():
  x = gaussian_features(0, 300, 24, shift=3.0)
  mu, sigma = metrics.statistics([x[:100], x[100:250], x[250:]])
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(
    sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12
  )
  with pytest.raises(ValueError, match="at least 2"):
    metrics.statistics(x[:1])


def test_frechet_distance_matches_eigen_reference():
  a, b = gaussian_features(1, 400, 32), gaussian_features(2, 300, 32, shift=0.5)
  mu1, s1 = metrics.statistics(a)
  mu2, s2 = metrics.statistics(b)
  want = reference_frechet(mu1, s1, mu2, s2)
  assert want > 1.0
  np.testing.assert_allclose(metrics.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-8)
  np.testing.assert_allclose(
    metrics.frechet_distance(mu1, s1, mu2, s2, method="eigh"), want, rtol=1e-8
  )
  # A set against itself: 0 up to the square root's rounding.
  assert abs(metrics.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
  assert abs(metrics.frechet_distance(mu1, s1, mu1, s1, method="eigh")) < 1e-8
  with pytest.raises(ValueError, match="different sizes"):
    metrics.frechet_distance(mu1, s1, mu2[:5], s2[:5, :5])


def test_frechet_distance_of_rank_deficient_statistics():
  """Fewer samples than dimensions: singular covariances still give the eigen reference's value."""
  a, b = gaussian_features(3, 20, 32), gaussian_features(4, 20, 32, shift=0.3)
  mu1, s1 = metrics.statistics(a)
  mu2, s2 = metrics.statistics(b)
  np.testing.assert_allclose(
    metrics.frechet_distance(mu1, s1, mu2, s2), reference_frechet(mu1, s1, mu2, s2), rtol=1e-5
  )


def test_inception_score_matches_reference():
  rng = np.random.default_rng(5)
  pool3 = rng.uniform(0, 1, (130, 40)).astype(np.float32)
  w = rng.normal(0, 0.5, (40, 17)).astype(np.float32)
  probs = metrics.inception_probs(pool3, w, chunk=32)
  logits = pool3.astype(np.float64) @ w
  want_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  np.testing.assert_allclose(probs, want_p, rtol=1e-5, atol=1e-7)
  splits = [want_p[i : i + 50] for i in range(0, 130, 50)]  # 50, 50, 30.
  want = np.mean([np.exp(np.mean([scipy.stats.entropy(p, s.mean(0)) for p in s])) for s in splits])
  np.testing.assert_allclose(metrics.inception_score(probs, split_size=50), want, rtol=1e-5)
  assert metrics.inception_score(probs, split_size=50) > 1.0


def reference_precision_recall(ref, samples, k):
  def d2(u, v):
    return ((u[:, None, :].astype(np.float64) - v[None, :, :]) ** 2).sum(-1)

  ref_radii = np.sort(d2(ref, ref), axis=1)[:, k]
  sample_radii = np.sort(d2(samples, samples), axis=1)[:, k]
  cross = d2(samples, ref)  # [samples, ref]
  precision = np.mean((cross <= ref_radii[None, :]).any(1))
  recall = np.mean((cross <= sample_radii[:, None]).any(0))
  return precision, recall


@pytest.mark.parametrize("block", [16, 10000])
def test_precision_recall_matches_reference(block):
  """Blocks of 16 over 53 references and 37 samples exercise the padding of every partial block."""
  ref = gaussian_features(6, 53, 8)
  samples = gaussian_features(7, 37, 8, shift=0.6)
  want = reference_precision_recall(ref, samples, 3)
  assert 0 < want[0] < 1 and 0 < want[1] < 1  # Neither trivially 0 nor 1.
  got = metrics.precision_recall(ref, samples, k=3, block=block)
  np.testing.assert_allclose(got, want, atol=1e-12)
  radii = metrics.manifold_radii(ref, 3, block)
  d = ((ref[:, None, :].astype(np.float64) - ref[None]) ** 2).sum(-1)
  np.testing.assert_allclose(radii, np.sort(d, 1)[:, 3], rtol=1e-4, atol=1e-4)


def test_precision_recall_of_a_set_with_itself_is_one():
  x = gaussian_features(8, 40, 8)
  assert metrics.precision_recall(x, x, block=16) == (1.0, 1.0)
  with pytest.raises(ValueError, match="more than k = 3"):
    metrics.manifold_radii(x[:3])
