"""`evaluate.py`'s job: score an `.npz` of samples with the evaluation network."""

from __future__ import annotations

import json
import os
from typing import Optional

from cfg_jax import data, paths
from cfg_jax.app import files
from cfg_jax.evaluation import check_samples, evalnet, evaluate, format_table


def evaluate_npz(samples_path: str, dataset: str = "digits", data_dir: Optional[str] = None,
                 evalnet_dir: Optional[str] = None, out: Optional[str] = None,
                 overwrite: bool = False) -> tuple[dict, str]:
  """Scores the samples of `samples_path` against `dataset`; writes the scores as JSON to
  `out` (default: beside the samples, NAME.eval.json). Returns (scores, the JSON's path)."""
  out = out or os.path.splitext(samples_path)[0] + ".eval.json"
  files.check_output_free(out, overwrite)
  spec = data.spec(dataset)
  samples, labels = files.read_npz(samples_path, spec.image_shape, spec.num_classes)
  check_samples(samples, labels)
  net = evalnet.load_or_train(dataset, evalnet_dir, data_dir)
  splits = [data.load_split(dataset, s, data_dir) for s in ("test", "train")]
  scores = {"samples": samples_path, "evalnet_test_accuracy": net.test_accuracy,
            **evaluate(samples, labels, net, *splits)}
  with paths.atomic_path(out, ".json") as tmp, open(tmp, "w") as f:
    json.dump(scores, f, indent=2)
  return scores, out


def table(scores: dict) -> str:
  return format_table([{"name": os.path.basename(scores["samples"]), **scores}])
