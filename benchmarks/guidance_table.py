"""Every guidance rule and DPM-Solver++ on one trained model, scored alike (issue 9).

  python benchmarks/guidance_table.py --workdir runs/digits       # ~25 min on 2 CPU cores
  python benchmarks/guidance_table.py --parts=solvers             # the solver rows only

`rules`: plain CFG, CFG in Kynkäänniemi et al.'s interval, rescaled CFG, APG, CFG++ and
autoguidance (the weak model: the run's own checkpoint at --weak_step), a few scales each,
DDIM 50 steps. `solvers`: DPM-Solver++(2M) at 10, 15 and 20 steps against DDIM 50, plain CFG
at --solver_scale, with the sampling seconds per 1,000 images after compilation (the best of
two timed runs). Every row: --num_samples balanced labels, seed 0, the evaluation network of
`sweep.py`. Prints Markdown tables and writes them, with every row as JSON, to --out_dir.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from cfg_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "Trained workdir (python train.py).")
_OUT = flags.DEFINE_string("out_dir", None, "Default: WORKDIR/guidance_table.")
_PARTS = flags.DEFINE_list("parts", ["rules", "solvers"], "rules, solvers.")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Samples per row.")
_BATCH = flags.DEFINE_integer("batch_size", 250, "Images per scale in a compiled call.")
_WEAK_STEP = flags.DEFINE_integer("weak_step", 500, "Autoguidance: the weak checkpoint.")
_SOLVER_SCALE = flags.DEFINE_float("solver_scale", 1.25, "CFG γ of the solver rows.")

# (folder, name, rule keywords of generate.guidance_rule, scales); DDIM 50 steps.
RULES = (
    ("cfg", "CFG", {"guidance": "cfg"}, (1.0, 1.25, 1.5, 2.0, 3.0)),
    # The interval of Kynkäänniemi et al. 2024 for EDM2 (σ in (0.28, 5.42]).
    ("cfg_interval", "CFG, interval (0.28, 5.42]", {"guidance": "cfg", "interval": "0.28,5.42"},
     (1.5, 2.0, 3.0)),
    ("cfg_rescale", "CFG, rescale φ = 0.7", {"guidance": "cfg", "rescale": 0.7}, (1.5, 3.0)),
    ("apg", "APG (η = 0, β = −0.5)", {"guidance": "apg", "apg_momentum": -0.5}, (2.0, 3.0, 5.0)),
    ("cfgpp", "CFG++", {"guidance": "cfgpp"}, (0.2, 0.4, 0.6)),
    ("autoguidance", "autoguidance", {"guidance": "autoguidance"}, (1.5, 2.0, 3.0)),
)
SOLVERS = (("ddim", 50, "leading"), ("dpmpp_2m", 10, "trailing"),
           ("dpmpp_2m", 15, "trailing"), ("dpmpp_2m", 20, "trailing"))
COLUMNS = ("accuracy", "fid", "precision", "recall")


def rule_rows(workdir, out_dir):
  from cfg_jax.evaluation import sweep

  rows = []
  for folder, name, rule, scales in RULES:
    rule = dict(rule)
    if rule["guidance"] == "autoguidance":
      rule["weak_step"] = _WEAK_STEP.value
    found = sweep.run_sweep(workdir=workdir, guidance_scales=scales, rule=rule,
                            num_samples=_NUM.value, batch_size=_BATCH.value, overwrite=True,
                            out_dir=os.path.join(out_dir, folder))
    rows += [{**row, "guidance": name} for row in found]
  return rows


def solver_rows(workdir, out_dir):
  import jax

  from cfg_jax import data, generate, pipeline
  from cfg_jax.evaluation import evaluate
  from cfg_jax.evaluation import evalnet as evalnet_lib

  model = pipeline.load(workdir)
  net = evalnet_lib.load_or_train(model.config.data.name)
  test, train = (data.load_split(model.config.data.name, s) for s in ("test", "train"))
  labels = generate.balanced_labels(_NUM.value, model.num_classes)
  rows = []
  for method, steps, spacing in SOLVERS:
    options = dict(method=method, num_steps=steps, timestep_spacing=spacing,
                   batch_size=_BATCH.value, guidance_scale=_SOLVER_SCALE.value)
    generate.generate(jax.random.key(1), model, labels[:_BATCH.value], **options)  # compile
    seconds = []
    for _ in range(2):
      start = time.perf_counter()
      samples = generate.generate(jax.random.key(0), model, labels, **options)
      seconds.append(time.perf_counter() - start)
    rows.append({"guidance": f"{method} {steps} steps ({spacing})",
                 "scale": _SOLVER_SCALE.value,
                 "seconds_per_1000": min(seconds) * 1000 / len(labels),
                 **evaluate(samples, labels, net, test, train)})
    print(rows[-1], flush=True)
  return rows


def markdown(rows, extra=()):
  head = ("rule", "scale", *COLUMNS, *extra)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
  for r in rows:
    cells = [r["guidance"], f"{r['scale']:g}"] + [f"{r[c]:.3f}" if c != "fid" else
                                                 f"{r[c]:.1f}" for c in COLUMNS]
    cells += [f"{r[c]:.1f}" for c in extra]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  cli.start(argv)
  workdir = _WORKDIR.value
  out_dir = _OUT.value or os.path.join(workdir, "guidance_table")
  os.makedirs(out_dir, exist_ok=True)
  tables, everything = [], {}
  if "rules" in _PARTS.value:
    everything["rules"] = rows = rule_rows(workdir, out_dir)
    tables.append(markdown(rows))
  if "solvers" in _PARTS.value:
    everything["solvers"] = rows = solver_rows(workdir, out_dir)
    tables.append(markdown(rows, extra=("seconds_per_1000",)))
  text = "\n\n".join(tables)
  print(text)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out_dir, "rows.json"), "w") as f:
    json.dump(everything, f, indent=2)


if __name__ == "__main__":
  app.run(main)
