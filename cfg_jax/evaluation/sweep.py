"""Guidance sweeps: sample one trained model at several scales and score every set.

All scales use the same seed (so the same x_T) and the same balanced labels; the sampler is
compiled once, since scales are traced values. Sampling spans every device of every process.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Optional, Sequence

import jax
from absl import logging

from cfg_jax import data, distributed, generate, io, pipeline
from cfg_jax.evaluation import METRIC_NAMES, evalnet as evalnet_lib, evaluate, format_table

FILES = ("sweep.json", "sweep.csv", "sweep.png")


def run_sweep(*, workdir: str, guidance_scales: Sequence[float] = (),
              classifier_scales: Sequence[float] = (), classifier_base_guidance: float = 0.0,
              num_samples: int = 1000, seed: int = 0, method: str = "ddim", num_steps: int = 50,
              batch_size: int = 500, out_dir: Optional[str] = None,
              evalnet_dir: Optional[str] = None, overwrite: bool = False) -> list[dict]:
  """Returns one row per scale and writes sweep.{json,csv,png} to out_dir."""
  from tqdm.auto import tqdm

  out_dir = out_dir or os.path.join(workdir, "sweep")
  for name in FILES:
    io.check_output_free(os.path.join(out_dir, name), overwrite)
  if not guidance_scales and not classifier_scales:
    raise ValueError("Give at least one --guidance_scales or --classifier_scales value.")
  model = pipeline.load(workdir)
  config = model.config
  if classifier_scales and model.classifier_fn is None:
    raise ValueError(f"--classifier_scales needs a noisy classifier, but {workdir} has none.")
  data_dir = config.data.data_dir or None
  net = evalnet_lib.load_or_train(config.data.name, evalnet_dir, data_dir)
  test, train = (data.load_split(config.data.name, s, data_dir) for s in ("test", "train"))
  labels = generate.balanced_labels(num_samples, model.num_classes)
  runs = [("classifier-free", float(g), dict(guidance_scale=float(g))) for g in guidance_scales]
  runs += [("classifier", float(s), dict(guidance_scale=classifier_base_guidance,
                                         classifier_scale=float(s)))
           for s in classifier_scales]
  rows = []
  # Every process samples its share and scores the gathered set; process 0 writes.
  for kind, scale, kwargs in tqdm(runs, desc="sweep", unit="scale",
                                  disable=not distributed.is_main()):
    samples = generate.generate(jax.random.key(seed), model, labels, batch_size=batch_size,
                                method=method, num_steps=num_steps, **kwargs)
    row = {"guidance": kind, "scale": scale,
           **evaluate(samples, labels, net, test, train)}
    rows.append(row)
    logging.info("%s %g: %s", kind, scale, {k: round(row[k], 4) for k in METRIC_NAMES})
  if not distributed.is_main():
    return rows
  os.makedirs(out_dir, exist_ok=True)
  write_table(rows, out_dir, evalnet_accuracy=net.test_accuracy)
  plot(rows, os.path.join(out_dir, "sweep.png"), title=f"{config.data.name}: {num_samples} "
       f"samples per scale, {method} {num_steps} steps")
  return rows


def write_table(rows, out_dir, evalnet_accuracy):
  with open(os.path.join(out_dir, "sweep.json"), "w") as f:
    json.dump({"evalnet_test_accuracy": evalnet_accuracy, "rows": rows}, f, indent=2)
  with open(os.path.join(out_dir, "sweep.csv"), "w", newline="") as f:
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
  symbols = {"classifier-free": ("o-", "γ"), "classifier": ("s--", "s")}
  for ax, (x_key, y_key) in zip(axes, panels):
    for kind, (style, letter) in symbols.items():
      sub = [r for r in rows if r["guidance"] == kind]
      if not sub:
        continue
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
  fig.savefig(path, dpi=100)
  plt.close(fig)


def print_rows(rows):
  print(format_table(rows, keys=("guidance", "scale") + METRIC_NAMES))
