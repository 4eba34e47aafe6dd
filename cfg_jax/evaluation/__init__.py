"""Scoring samples: class accuracy, FID, Inception Score, precision/recall, memorisation."""

from __future__ import annotations

import numpy as np

from cfg_jax import data, errors, images
from cfg_jax.evaluation import metrics

# Precision/recall use k = 3 nearest neighbours, so each set needs at least k + 1 points.
MIN_SAMPLES = 4
METRIC_NAMES = ("accuracy", "fid", "inception_score", "precision", "recall", "memorization")


def evaluate(samples: np.ndarray, labels: np.ndarray, evalnet, test: data.Split,
             train: data.Split, seed: int = 0) -> dict:
  """All metrics for uint8 NHWC `samples` drawn for `labels`.

  FID and precision/recall compare evaluation-network features with the real test split
  (precision/recall on equally many samples, a random subset drawn with `seed` so a
  class-sorted file is not biased, as Kynkäänniemi et al. do); memorisation
  compares pixels with the training split, against the test split's own distances.
  """
  spec = data.spec(evalnet.dataset)
  check_samples(samples, labels)
  if samples.shape[1:] != spec.image_shape:
    raise errors.InputError(f"Samples have shape {samples.shape[1:]}, but {evalnet.dataset} images "
                     f"are {spec.image_shape}.")
  logits, features = evalnet(samples)
  _, real_features = evalnet(images.to_uint8(test.images))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  n = min(len(samples), len(real_features))
  rng = np.random.default_rng(seed)
  real_subset = real_features[rng.choice(len(real_features), n, replace=False)]
  fake_subset = features[rng.choice(len(features), n, replace=False)]
  precision, recall = metrics.precision_recall(real_subset, fake_subset, k=3)
  return {
      "num_samples": int(len(samples)),
      "accuracy": metrics.accuracy(logits, labels),
      "fid": metrics.fid(real_features, features),
      "inception_score": metrics.inception_score(probs),
      "precision": precision,
      "recall": recall,
      "memorization": metrics.memorization(images.from_uint8(samples), train.images, test.images),
  }


def check_samples(samples, labels) -> None:
  """Raises unless there are enough samples, one label each, to score."""
  if len(samples) < MIN_SAMPLES or len(samples) != len(labels):
    raise errors.InputError(f"Scoring needs at least {MIN_SAMPLES} samples with one label "
                            f"each, got {len(samples)} images and {len(labels)} labels.")


def format_table(rows: list[dict], keys=("name",) + METRIC_NAMES) -> str:
  """A plain-text table, one row per evaluated sample set."""
  keys = [k for k in keys if any(k in r for r in rows)]
  cells = [[k for k in keys]] + [[_fmt(r.get(k, "")) for k in keys] for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(keys))]
  lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(keys))) for c in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def _fmt(value):
  return f"{value:.4f}" if isinstance(value, float) else str(value)
