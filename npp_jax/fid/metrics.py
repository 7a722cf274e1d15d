"""FID, sFID, Inception Score, precision and recall, computed as OpenAI's ADM evaluator computes
them.

The evaluator (guided-diffusion's evaluations/evaluator.py) is what the NPP paper and LlamaGen
report with:
* FID / sFID: Frechet distance between Gaussians fitted to pool3 / spatial features: mean and np.cov
  (N - 1 normalisation), then scipy.linalg.sqrtm of sigma1 @ sigma2; a non-finite root is retried
  with 1e-6 added to both diagonals; a complex root is accepted (its real part taken) only when the
  imaginary part of its diagonal is within 1e-3 of 0, else it is an error.
* IS: softmax(pool3 @ W) with the graph's fc weights W and no bias, then exp(mean KL(p(y|x) ||
p(y)))
  over consecutive splits of 5000 samples (10 splits for 50,000), averaged.
* Precision / recall (Kynkaanniemi et al. 2019): each set's k = 3 nearest-neighbour radius (the 4th
smallest
  squared distance to its own set, which includes the point itself); precision is the fraction of
  samples inside some reference ball, recall the fraction of references inside some sample ball.
  Squared distances |u|^2 - 2 u.v + |v|^2 clipped at 0, in blocks, so 50,000 x 50,000 distances
  never sit in memory. One difference: the evaluator takes the distances in float16 (float32 when
  that overflows); these are float32 throughout.
"""

import functools
from typing import Iterable
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

IS_SPLIT_SIZE = 5000
NEIGHBOURS = 3
BLOCK = (
  10000  # Rows and columns per distance block (the evaluator's batch sizes): 400 MB in float32.
)


# --------------------------------------------------------------------------------------------------
# Frechet distances.


def statistics(chunks: Iterable[np.ndarray] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) in float64 of features [N, D], given whole or as a re-iterable of chunks [n_i, D].

  sigma is np.cov(x, rowvar=False), accumulated per chunk after centring (two passes), so 50,000 x
  2048 features never need a float64 copy.
  """
  if isinstance(chunks, np.ndarray):
    chunks = [chunks]
  total, n = None, 0
  for x in chunks:
    x = np.asarray(x, np.float64)
    total = x.sum(0) if total is None else total + x.sum(0)
    n += len(x)
  if n < 2:
    raise ValueError(f"{n} feature vectors; expected at least 2 for a covariance")
  mu = total / n
  sigma = np.zeros((len(mu), len(mu)))
  for x in chunks:
    centred = np.asarray(x, np.float64) - mu
    sigma += centred.T @ centred
  return mu, sigma / (n - 1)


FID_METHODS = ("sqrtm", "eigh")


def _trace_sqrt_eigh(sigma1, sigma2) -> float:
  """tr sqrt(sigma1 sigma2) = sum of sqrt(eigenvalues of sqrt(sigma1) sigma2 sqrt(sigma1)), a
  symmetric PSD matrix: two symmetric eigendecompositions instead of a general Schur form."""
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  eig = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  return float(np.sum(np.sqrt(np.clip(eig, 0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
  """|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)).

  method "sqrtm" is the evaluator's, with its safeguards; "eigh" computes the same trace from
  symmetric eigendecompositions: equal for positive semi-definite statistics, several times faster
  at 2048 dimensions on a CPU and never complex (it clips the round-off negatives that make sqrtm
  complex).
  """
  if method not in FID_METHODS:
    raise ValueError(f"FID method {method!r}; expected one of {FID_METHODS}")
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(
      f"statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} "
      f"vs {sigma2.shape}; expected features of the same network layer and input size"
    )
  diff = mu1 - mu2
  if method == "eigh":
    return float(
      diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_eigh(sigma1, sigma2)
    )
  with warnings.catch_warnings():
    warnings.simplefilter(
      "ignore"
    )  # sqrtm warns on near-singular products; the checks below decide.
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
      warnings.warn(f"FID: singular product; adding {eps} to the diagonal of the covariances")
      offset = np.eye(sigma1.shape[0]) * eps
      covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(
        f"the matrix square root has an imaginary component of {np.abs(covmean.imag).max()}"
        "; expected the statistics of more samples than feature dimensions"
      )
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------------------------------
# Inception Score.


def inception_probs(pool3: np.ndarray, fc_kernel: np.ndarray, chunk: int = 512) -> np.ndarray:
  """softmax(pool3 @ W) in float32, W [2048, 1008] the fc kernel, no bias: the evaluator's softmax
  graph."""
  out = []
  w = np.asarray(fc_kernel, np.float32)
  for start in range(0, len(pool3), chunk):
    logits = np.asarray(pool3[start : start + chunk], np.float32) @ w
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    out.append(p / p.sum(-1, keepdims=True))
  return np.concatenate(out)


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """Mean over consecutive splits of exp(E_x KL(p(y|x) || p(y))), p(y) the split's mean."""
  scores = []
  for start in range(0, len(probs), split_size):
    part = np.asarray(probs[start : start + split_size])
    kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
    scores.append(np.exp(kl.sum(1).mean()))
  return float(np.mean(scores))


# --------------------------------------------------------------------------------------------------
# Precision and recall.


def _sq_distances(u, v):
  nu = jnp.sum(u * u, axis=1)[:, None]
  nv = jnp.sum(v * v, axis=1)[None, :]
  return jnp.maximum(nu - 2.0 * (u @ v.T) + nv, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _merge_smallest(best, u, v, v_valid, *, k: int):
  """The k smallest distances of each row of u to the valid rows of v, merged with `best` [rows,
  k]."""
  d = jnp.where(v_valid[None, :], _sq_distances(u, v), jnp.inf)
  both = jnp.concatenate([best, d], axis=1)
  return -jax.lax.top_k(-both, k)[0]


@jax.jit
def _inside(u, radii_u, u_valid, v, radii_v, v_valid):
  """(u_in [rows]: u inside some ball of a valid v; v_in [cols]: v inside some ball of a valid
  u)."""
  d = _sq_distances(u, v)
  u_in = jnp.any((d <= radii_v[None, :]) & v_valid[None, :], axis=1)
  v_in = jnp.any((d <= radii_u[:, None]) & u_valid[:, None], axis=0)
  return u_in, v_in


def _blocks(x: np.ndarray, block: int):
  """(start, padded block [block, D] float32, valid mask [block]) over x: one compiled shape."""
  block = min(block, len(x))
  for start in range(0, len(x), block):
    piece = np.asarray(x[start : start + block], np.float32)
    valid = np.zeros(block, bool)
    valid[: len(piece)] = True
    if len(piece) < block:
      piece = np.concatenate([piece, np.zeros((block - len(piece), x.shape[1]), np.float32)])
    yield start, piece, valid


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURS, block: int = BLOCK) -> np.ndarray:
  """float32 [N]: the squared distance of every point to its k-th nearest neighbour in the set."""
  if len(features) <= k:
    raise ValueError(
      f"{len(features)} feature vectors; expected more than k = {k} for the k-NN radii"
    )
  radii = np.zeros(len(features), np.float32)
  for start, rows, row_valid in _blocks(features, block):
    best = jnp.full((len(rows), k + 1), jnp.inf, jnp.float32)
    for _, cols, col_valid in _blocks(features, block):
      best = _merge_smallest(
        best, rows, cols, col_valid, k=k + 1
      )  # k + 1: the point itself is 0 away.
    n = int(row_valid.sum())
    radii[start : start + n] = np.asarray(best[:n, k])
  return radii


def precision_recall(
  ref: np.ndarray, samples: np.ndarray, k: int = NEIGHBOURS, block: int = BLOCK
) -> tuple[float, float]:
  """(precision, recall) of sample features against reference features (both [N, D])."""
  ref_radii = manifold_radii(ref, k, block)
  sample_radii = manifold_radii(samples, k, block)
  ref_in = np.zeros(len(ref), bool)  # Reference points covered by the samples' manifold: recall.
  sample_in = np.zeros(
    len(samples), bool
  )  # Samples covered by the references' manifold: precision.
  for a, rows, row_valid in _blocks(ref, block):
    n = int(row_valid.sum())
    radii_rows = np.zeros(len(rows), np.float32)
    radii_rows[:n] = ref_radii[a : a + n]
    for b, cols, col_valid in _blocks(samples, block):
      m = int(col_valid.sum())
      radii_cols = np.zeros(len(cols), np.float32)
      radii_cols[:m] = sample_radii[b : b + m]
      r_in, s_in = _inside(rows, radii_rows, row_valid, cols, radii_cols, col_valid)
      ref_in[a : a + n] |= np.asarray(r_in)[:n]
      sample_in[b : b + m] |= np.asarray(s_in)[:m]
  return float(sample_in.mean()), float(ref_in.mean())
