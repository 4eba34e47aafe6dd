"""The metrics against independent computations with known answers."""

import numpy as np
import pytest

from cfg_jax.evaluation import metrics


def test_frechet_distance_of_gaussians_in_closed_form():
  # Diagonal covariances commute: FID = |Δμ|² + Σ_i (σ1_i − σ2_i)².
  mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
  var1, var2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
  expected = 1 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + (3 - 1) ** 2
  assert metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)
  # A rotated pair: FID is invariant under a shared rotation.
  q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((3, 3)))
  rotated = metrics.frechet_distance(q @ mu1, q @ np.diag(var1) @ q.T, q @ mu2,
                                     q @ np.diag(var2) @ q.T)
  assert rotated == pytest.approx(expected, rel=1e-6)


def test_fid_from_samples_converges_to_the_closed_form():
  rng = np.random.default_rng(1)
  a = rng.standard_normal((200_000, 2))
  b = rng.standard_normal((200_000, 2)) * 2 + [3, 0]
  assert metrics.fid(a, a) == pytest.approx(0, abs=1e-6)
  assert metrics.fid(a, b) == pytest.approx(9 + 2 * (2 - 1) ** 2, rel=0.01)


def test_inception_score_known_cases():
  k = 10
  confident_balanced = np.eye(k)[np.arange(1000) % k]
  assert metrics.inception_score(confident_balanced) == pytest.approx(k, rel=1e-6)
  one_class = np.eye(k)[np.zeros(1000, int)]
  assert metrics.inception_score(one_class) == pytest.approx(1.0)
  uniform = np.full((1000, k), 1 / k)
  assert metrics.inception_score(uniform) == pytest.approx(1.0)
  assert metrics.inception_score(confident_balanced, num_splits=10) == pytest.approx(k, rel=1e-6)


def test_accuracy():
  logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])
  assert metrics.accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)


def test_precision_recall_on_constructed_sets():
  grid = np.stack(np.meshgrid(np.arange(10.0), np.arange(10.0)), -1).reshape(-1, 2)
  assert metrics.precision_recall(grid, grid.copy(), k=3) == (1.0, 1.0)
  # Samples far from the data: neither fidelity nor coverage.
  assert metrics.precision_recall(grid, grid + 100.0, k=3) == (0.0, 0.0)
  # Samples on the left half of the data only (mode dropping): precise, half the recall.
  left = grid[grid[:, 0] < 5]
  precision, recall = metrics.precision_recall(grid, np.concatenate([left, left + 1e-3]), k=3)
  assert precision == 1.0
  # Real points in columns 0..4 are covered, and column 5 lies within one grid step.
  assert recall == pytest.approx(0.6)


def test_memorization():
  rng = np.random.default_rng(2)
  train, held_out = rng.standard_normal((500, 16)), rng.standard_normal((200, 16))
  assert metrics.memorization(train[:100], train, held_out) == 1.0  # exact copies
  fresh = rng.standard_normal((2000, 16))
  share = metrics.memorization(fresh, train, held_out, quantile=0.05)
  assert share == pytest.approx(0.05, abs=0.03)


class _PixelNet:
  """A stand-in evaluation network: features are the first two pixels, logits their class."""

  dataset = "digits"

  def __call__(self, images):
    flat = np.asarray(images, np.float64).reshape(len(images), -1)
    features = flat[:, :2]
    logits = np.eye(10)[np.clip(np.round(features[:, 0] / 20), 0, 9).astype(int)] * 5.0
    return logits, features


def _class_images(labels, rng):
  """uint8 8×8 images whose first two pixels sit near (20·label, 100)."""
  images = rng.integers(0, 256, (len(labels), 8, 8, 1)).astype(np.uint8)
  images[:, 0, 0, 0] = 20 * labels + rng.integers(0, 4, len(labels))
  images[:, 0, 1, 0] = 100 + rng.integers(0, 4, len(labels))
  return images


def test_precision_recall_use_a_random_subset_of_the_real_set():
  """The real split is sorted by class: its first n images hold 2 of 10 classes, so
  precision would be 0.2 on balanced samples; a seeded random subset covers all classes."""
  from cfg_jax import data, images
  from cfg_jax.evaluation import evaluate

  rng = np.random.default_rng(3)
  real_labels = np.repeat(np.arange(10), 50)  # class-sorted, 500 images
  test = data.Split(images=images.from_uint8(_class_images(real_labels, rng)), labels=real_labels)
  train = data.Split(images=test.images[::5], labels=real_labels[::5])
  labels = np.arange(100) % 10  # balanced, n = 100 < 500 real images
  samples = _class_images(labels, rng)
  scores = evaluate(samples, labels, _PixelNet(), test, train)
  assert scores["accuracy"] == 1.0
  assert scores["precision"] > 0.9 and scores["recall"] > 0.9, scores
