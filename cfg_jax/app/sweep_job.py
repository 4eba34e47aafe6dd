"""`sweep.py`'s job: sample one trained model at several guidance scales, score every set.

All scales use the same seed (so the same x_T) and the same balanced labels. The scales of
the guidance rule are sampled together, as one compiled call per batch (a 1-D array of
scales); classifier-guidance scales s ≠ 0 reuse one compiled sampler, since scales are traced
(s = 0 compiles without the classifier).
Sampling spans every device of every process.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence

import jax
import numpy as np
from absl import logging

from cfg_jax import data, distributed, errors, paths, pipeline, sharded_sampling
from cfg_jax.app import files, sample_job
from cfg_jax.evaluation import METRIC_NAMES, MIN_SAMPLES, evalnet, evaluate, format_table

# The scales swept when none are given, by --guidance.
DEFAULT_SCALES = {"cfg": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0), "apg": (1.0, 2.0, 3.0, 5.0, 8.0),
                  "cfgpp": (0.0, 0.2, 0.4, 0.6, 0.8, 1.0), "autoguidance": (1.0, 1.5, 2.0, 3.0),
                  "cfgzero": (1.0, 1.5, 2.0, 3.0, 5.0), "icg": (1.0, 1.5, 2.0, 3.0, 5.0)}


def run_sweep(*, workdir: str, guidance_scales: Sequence[float] = (),
              classifier_scales: Sequence[float] = (), classifier_base_guidance: float = 0.0,
              num_samples: int = 1000, seed: int = 0, method: str = "ddim", num_steps: int = 50,
              batch_size: int = 500, out_dir: Optional[str] = None,
              evalnet_dir: Optional[str] = None, overwrite: bool = False,
              rule: Optional[dict] = None, **sample_options) -> list[dict]:
  """Returns one row per scale and writes sweep.{json,csv,png} to out_dir.

  `guidance_scales` are the scales of the rule that `rule` describes
  (`sample_job.guidance_rule`'s keywords, e.g. {"guidance": "apg", "apg_momentum": -0.5};
  default plain CFG), all sampled in one compiled call per batch. `sample_options` go to
  the sampler (e.g. timestep_spacing, dynamic_threshold).
  """
  from tqdm.auto import tqdm

  out_dir = out_dir or paths.sweep_dir(workdir)
  for name in paths.SWEEP_FILES:
    files.check_output_free(os.path.join(out_dir, name), overwrite)
  if not guidance_scales and not classifier_scales:
    raise errors.InputError("Give at least one --guidance_scales or --classifier_scales value.")
  if num_samples < MIN_SAMPLES:
    raise errors.InputError(f"--num_samples must be at least {MIN_SAMPLES} to score, got "
                            f"{num_samples}.")
  model = pipeline.load(workdir)
  config = model.config
  if classifier_scales and model.classifier_fn is None:
    raise errors.InputError(f"--classifier_scales needs a noisy classifier, but {workdir} has "
                            "none.")
  sharded_sampling.check_batch_size(batch_size)
  # The sampler's own checks, before the evaluation network may be trained.
  model.check_options(method=method, num_steps=num_steps, **sample_options)
  rule = dict(rule or {})
  guided = None
  if guidance_scales:  # built before the evaluation network: bad flags fail fast
    guided = sample_job.guidance_rule(model, workdir, guidance_scale=np.asarray(
        guidance_scales, np.float32), method=method, **rule)
  data_dir = config.data.data_dir or None
  net = evalnet.load_or_train(config.data.name, evalnet_dir, data_dir)
  test, train = (data.load_split(config.data.name, s, data_dir) for s in ("test", "train"))
  labels = sample_job.balanced_labels(num_samples, model.num_classes)
  options = dict(method=method, num_steps=num_steps, batch_size=batch_size, **sample_options)
  runs = []  # (name, scales, samples of shape (G, N, H, W, C)), sampled as they are scored
  if guided is not None:
    runs.append((rule_name(rule), guidance_scales, lambda: sharded_sampling.sample_batches(
        jax.random.key(seed), model, labels, guidance=guided, progress=True, **options)))
  for s in classifier_scales:
    runs.append(("classifier", (s,), lambda s=s: sharded_sampling.sample_batches(
        jax.random.key(seed), model, labels, classifier_scale=float(s),
        **sample_job.free_guidance(model, classifier_base_guidance), **options)[None]))
  rows = []
  # Every process samples its share and scores the gathered set; process 0 writes.
  for name, scales, draw in tqdm(runs, desc="sweep", unit="rule",
                                 disable=not distributed.is_main()):
    for scale, samples in zip(scales, draw()):
      row = {"guidance": name, "scale": float(scale),
             **evaluate(samples, labels, net, test, train)}
      rows.append(row)
      logging.info("%s %g: %s", name, scale, {k: round(row[k], 4) for k in METRIC_NAMES})
  if not distributed.is_main():
    return rows
  os.makedirs(out_dir, exist_ok=True)
  write_table(rows, out_dir, evalnet_accuracy=net.test_accuracy)
  settings = "".join(f", {k}={v}" for k, v in sample_options.items() if v is not None)
  plot(rows, os.path.join(out_dir, paths.SWEEP_PLOT), title=f"{config.data.name}: {num_samples} "
       f"samples per scale, {method} {num_steps} steps{settings}")
  return rows


def rule_name(rule: dict) -> str:
  """A row's name for a rule: "classifier-free" (plain CFG), "apg", ..., with
  the options given, e.g. "classifier-free (interval=0.28,5.42 rescale=0.7)"."""
  kind = rule.get("guidance", "cfg")
  name = "classifier-free" if kind == "cfg" else kind
  options = " ".join(f"{k}={v}" for k, v in rule.items() if k != "guidance" and v is not None)
  return f"{name} ({options})" if options else name


def write_table(rows, out_dir, evalnet_accuracy):
  with paths.atomic_path(os.path.join(out_dir, paths.SWEEP_TABLE)) as tmp, open(tmp, "w") as f:
    json.dump({"evalnet_test_accuracy": evalnet_accuracy, "rows": rows}, f, indent=2)
  csv_path = os.path.join(out_dir, paths.SWEEP_CSV)
  with paths.atomic_path(csv_path) as tmp, open(tmp, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)


def plot(rows, path, title=""):
  """FID against accuracy and precision against recall, one labelled point per scale."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  panels = [("accuracy", "fid"), ("inception_score", "fid"), ("recall", "precision")]
  names = list(dict.fromkeys(r["guidance"] for r in rows))  # in order of appearance
  for ax, (x_key, y_key) in zip(axes, panels):
    for kind in names:
      style, letter = ("s--", "s") if kind == "classifier" else ("o-", "γ")
      sub = [r for r in rows if r["guidance"] == kind]
      ax.plot([r[x_key] for r in sub], [r[y_key] for r in sub], style, label=kind)
      for r in sub:
        ax.annotate(f"{letter}={r['scale']:g}", (r[x_key], r[y_key]), fontsize=8,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel(x_key.replace("_", " "))
    ax.set_ylabel(y_key.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  with paths.atomic_path(path, ".png") as tmp:
    fig.savefig(tmp, dpi=100, format="png")
  plt.close(fig)


def print_rows(rows):
  print(format_table(rows, keys=("guidance", "scale") + METRIC_NAMES))
