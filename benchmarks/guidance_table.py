"""Every guidance rule and DPM-Solver++ on one trained model, scored alike.

  python benchmarks/guidance_table.py --workdir runs/digits       # ~25 min on 2 CPU cores
  python benchmarks/guidance_table.py --parts=solvers             # the solver rows only
  python train.py --config configs/digits_tiny.py --workdir /tmp/tiny && \
      python benchmarks/guidance_table.py --workdir /tmp/tiny --quick  # checks that it runs

`rules`: plain CFG, CFG in Kynkäänniemi et al.'s interval, rescaled CFG, APG, CFG++ and
autoguidance (the weak model: the run's own checkpoint at --weak_step), a few scales each,
DDIM 50 steps. `solvers`: DPM-Solver++(2M) at 10, 15 and 20 steps against DDIM 50, plain CFG
at --solver_scale, with the sampling seconds per 1,000 images after compilation (the best of
two timed runs) and each solver's speed-up over DDIM 50. Every row: --num_samples balanced
labels, seed 0, the evaluation network of `sweep.py`. Prints the machine and Markdown tables
and writes them, with every row as JSON, to --out_dir.

--quick: one scale per rule, 40 samples, DDIM 10 steps against DPM-Solver++ 5 steps, the
weak model at the run's first checkpoint, and a 60-step evaluation network of its own (in
OUT_DIR/evalnet_quick): its scores mean nothing, it only checks that every row runs.
"""

import json
import os
import time

from absl import app, flags

from cfg_jax.app import startup

import machine

_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "Trained workdir (python train.py).")
_OUT = flags.DEFINE_string("out_dir", None, "Default: WORKDIR/guidance_table.")
_PARTS = flags.DEFINE_list("parts", ["rules", "solvers"], "rules, solvers.")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Samples per row.")
_BATCH = flags.DEFINE_integer("batch_size", 250, "Images per scale in a compiled call.")
_WEAK_STEP = flags.DEFINE_integer("weak_step", 500, "Autoguidance: the weak checkpoint.")
_SOLVER_SCALE = flags.DEFINE_float("solver_scale", 1.25, "CFG γ of the solver rows.")
_EVALNET_DIR = flags.DEFINE_string("evalnet_dir", None, "The evaluation network's folder "
                                   "(default: sweep.py's, in the user cache).")
_QUICK = flags.DEFINE_bool("quick", False, "A few seconds per row: checks that it runs.")

# (folder, name, rule keywords of app.sample_job.guidance_rule, scales); DDIM 50 steps.
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
QUICK_SOLVERS = (("ddim", 10, "trailing"), ("dpmpp_2m", 5, "trailing"))
COLUMNS = ("accuracy", "fid", "precision", "recall")


def _evalnet_dir(workdir, out_dir):
  """The evaluation network's folder; with --quick a 60-step network of its own, trained
  here once (the sweep then loads it)."""
  if not _QUICK.value:
    return _EVALNET_DIR.value
  from cfg_jax import checkpoints, paths
  from cfg_jax.evaluation import evalnet

  dataset = checkpoints.read_config(paths.diffusion_checkpoints(workdir))["data"]["name"]
  directory = _EVALNET_DIR.value or os.path.join(out_dir, "evalnet_quick")
  evalnet.load_or_train(dataset, directory, num_steps=60)
  return directory


def _first_step(workdir):
  from cfg_jax import checkpoints, paths

  return min(checkpoints.manager(paths.diffusion_checkpoints(workdir), create=False).all_steps())


def rule_rows(workdir, out_dir, evalnet_dir):
  from cfg_jax.app import sweep_job

  quick = _QUICK.value
  rows = []
  for folder, name, rule, scales in RULES:
    rule = dict(rule)
    if rule["guidance"] == "autoguidance":
      rule["weak_step"] = _first_step(workdir) if quick else _WEAK_STEP.value
    found = sweep_job.run_sweep(
        workdir=workdir, guidance_scales=scales[-1:] if quick else scales, rule=rule,
        num_samples=_NUM.value, batch_size=_BATCH.value, overwrite=True,
        num_steps=10 if quick else 50, out_dir=os.path.join(out_dir, folder),
        evalnet_dir=evalnet_dir, **({"timestep_spacing": "trailing"} if quick else {}))
    rows += [{**row, "guidance": name} for row in found]
  return rows


def solver_rows(workdir, evalnet_dir):
  import jax

  from cfg_jax import data, pipeline, sharded_sampling
  from cfg_jax.app import sample_job
  from cfg_jax.evaluation import evalnet, evaluate

  model = pipeline.load(workdir)
  net = evalnet.load_or_train(model.config.data.name, evalnet_dir)
  test, train = (data.load_split(model.config.data.name, s) for s in ("test", "train"))
  labels = sample_job.balanced_labels(_NUM.value, model.num_classes)
  rows = []
  for method, steps, spacing in QUICK_SOLVERS if _QUICK.value else SOLVERS:
    options = dict(method=method, num_steps=steps, timestep_spacing=spacing,
                   batch_size=_BATCH.value, guidance_scale=_SOLVER_SCALE.value)
    sharded_sampling.sample_batches(jax.random.key(1), model, labels[:_BATCH.value],
                                    **options)  # compile
    seconds = []
    for _ in range(2):
      start = time.perf_counter()
      samples = sharded_sampling.sample_batches(jax.random.key(0), model, labels, **options)
      seconds.append(time.perf_counter() - start)
    rows.append({"guidance": f"{method} {steps} steps ({spacing})",
                 "scale": _SOLVER_SCALE.value,
                 "seconds_per_1000": min(seconds) * 1000 / len(labels),
                 **evaluate(samples, labels, net, test, train)})
    rows[-1]["speed_up"] = rows[0]["seconds_per_1000"] / rows[-1]["seconds_per_1000"]
    print(rows[-1], flush=True)
  return rows


def markdown(rows, extra=()):
  head = ("rule", "scale", *COLUMNS, *extra)
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
  for r in rows:
    cells = [r["guidance"], f"{r['scale']:g}"] + [f"{r[c]:.3f}" if c != "fid" else
                                                 f"{r[c]:.1f}" for c in COLUMNS]
    cells += [f"{r[c]:.1f}" if c != "speed_up" else f"{r[c]:.2f}x" for c in extra]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv):
  startup.start(argv)  # as the entry points: XLA flags, compilation cache, quiet console
  if _QUICK.value:
    for holder, value in ((_NUM, 40), (_BATCH, 20)):
      if not flags.FLAGS[holder.name].present:
        flags.FLAGS[holder.name].value = value
  workdir = _WORKDIR.value
  out_dir = _OUT.value or os.path.join(workdir, "guidance_table")
  os.makedirs(out_dir, exist_ok=True)
  evalnet_dir = _evalnet_dir(workdir, out_dir)
  tables, everything = [machine.describe()], {"machine": machine.describe()}
  if "rules" in _PARTS.value:
    everything["rules"] = rows = rule_rows(workdir, out_dir, evalnet_dir)
    tables.append(markdown(rows))
  if "solvers" in _PARTS.value:
    everything["solvers"] = rows = solver_rows(workdir, evalnet_dir)
    tables.append(markdown(rows, extra=("seconds_per_1000", "speed_up")))
  tables.append(machine.load())
  text = "\n\n".join(tables)
  print(text)
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(out_dir, "rows.json"), "w") as f:
    json.dump(everything, f, indent=2)


if __name__ == "__main__":
  app.run(main)
