"""Sample-quality metrics as pure functions of arrays (NumPy, float64).

Features and class probabilities come from an evaluation network (see `evalnet`), which
plays the role Inception-v3 plays on ImageNet.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.linalg


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
  """Share of samples the evaluation network assigns to their requested label."""
  return float(np.mean(np.argmax(logits, axis=-1) == np.asarray(labels)))


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """|μ1 − μ2|² + tr(Σ1 + Σ2 − 2(Σ1Σ2)^½), as in Heusel et al. (2017) and pytorch-fid."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  with warnings.catch_warnings():  # singular products are handled just below
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # regularise as pytorch-fid does
      offset = np.eye(sigma1.shape[0]) * 1e-6
      covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def feature_statistics(features: np.ndarray):
  features = np.asarray(features, np.float64)
  return features.mean(axis=0), np.cov(features, rowvar=False)


def fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
  """FID between two sets of evaluation-network features."""
  return frechet_distance(*feature_statistics(features_a), *feature_statistics(features_b))


def inception_score(probs: np.ndarray, num_splits: int = 1) -> float:
  """exp E_x KL(p(y|x) ‖ p(y)), averaged over `num_splits` equal splits (Salimans et al.)."""
  probs = np.asarray(probs, np.float64)
  scores = []
  for part in np.array_split(probs, num_splits):
    marginal = part.mean(axis=0, keepdims=True)
    kl = np.sum(part * (np.log(part + 1e-12) - np.log(marginal + 1e-12)), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


def _pairwise_distances(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  squared = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T
  return np.sqrt(np.maximum(squared, 0.0))


def _knn_radii(points, k):
  """Distance from each point to its k-th nearest other point in the same set."""
  distances = _pairwise_distances(points, points)
  return np.sort(distances, axis=1)[:, k]  # column 0 is the point itself


def _coverage(reference, radii, queries):
  """Share of queries inside at least one reference ball."""
  return float(np.mean((_pairwise_distances(queries, reference) <= radii[None]).any(axis=1)))


def precision_recall(real_features, fake_features, k: int = 3) -> tuple[float, float]:
  """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls.

  Precision: share of samples inside the real manifold (fidelity). Recall: share of real
  images inside the samples' manifold (diversity).
  """
  precision = _coverage(real_features, _knn_radii(real_features, k), fake_features)
  recall = _coverage(fake_features, _knn_radii(fake_features, k), real_features)
  return precision, recall


def nearest_distances(queries, reference, chunk: int = 1024) -> np.ndarray:
  """Euclidean distance from each query to its nearest reference point."""
  queries = np.asarray(queries, np.float64).reshape(len(queries), -1)
  reference = np.asarray(reference, np.float64).reshape(len(reference), -1)
  return np.concatenate([_pairwise_distances(queries[i:i + chunk], reference).min(axis=1)
                         for i in range(0, len(queries), chunk)])


def memorization(samples, train, held_out, quantile: float = 0.05) -> float:
  """Share of samples closer to their nearest training image than all but `quantile` of
  real held-out images are to theirs. A model that does not copy scores about `quantile`.
  """
  threshold = np.quantile(nearest_distances(held_out, train), quantile)
  return float(np.mean(nearest_distances(samples, train) < threshold))
