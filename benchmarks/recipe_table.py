"""A training recipe judged on every metric at once, over several seeds, against a baseline.

  python benchmarks/recipe_table.py              # configs/digits.py: ~10 min a seed, 2 CPU cores
  python benchmarks/recipe_table.py --candidate diffusion.min_snr_gamma=inf \
      --candidate optimizer.decay=constant --json recipe.json       # defaults vs a change
  python benchmarks/recipe_table.py --recipe configs/digits.py --override train.num_steps=2000
  python benchmarks/recipe_table.py --quick                         # checks that it runs
  python benchmarks/recipe_table.py --quick --candidate train.num_steps=8

A recipe is a config file (--recipe, default configs/digits.py) plus `--config.X=Y`
overrides, given as --override X=Y (repeatable; a leading `--config.` is accepted). With
--candidate X=Y (repeatable) and/or --candidate_recipe FILE a second recipe is trained: the
candidate's file (default: --recipe) with every --override and then every --candidate on
top, so the candidate is "the baseline plus the change". Both are checked (field names,
types, `config_checks.validate`) before anything trains.

Each recipe is trained once per seed (--seeds, config.seed = 0, 1, 2) by running the main
job, `train.py`, in a subprocess, each in its own workdir under --out_dir (default: a new
temporary folder); the subprocess's wall time, as `/usr/bin/time` would report it, is the
main job's wall time. Each seed's EMA model (`cfg_jax.load`, with its noisy classifier) is
then sampled (`sharded_sampling.sample_batches`) and scored in this process:

  rows:    classifier-free guidance at γ = 0, 1, 1.5, 3 (one compiled call, same x_T), and
           classifier guidance on the unconditional model (γ = 0) at s = 1, 3, 10;
           --num_samples balanced labels per row, DDIM --sampling_steps (50) steps, η = 0,
           sampling seed 0.
  columns: accuracy (the evaluation network's, `cfg_jax.evaluation`), FID on the evaluation
           network's features, pixel FID (`pixel_fid` below), KID (`kid` below),
           precision and recall (Kynkäänniemi et al. 2019, k = 3), all against the test
           split as `sweep.py` scores.

Tables give the mean over seeds and the min–max range; a comparison adds the row-by-row
difference (candidate − baseline), marked ✗ where the candidate is worse beyond the seed
spread (its best seed worse than the baseline's worst) and ✓ where it is better beyond it.
Everything is printed as Markdown, written to OUT_DIR/table.{md,json} and, with --json, to
that file as well (every seed's every number, for regenerating docs).

A seed whose workdir and record (OUT_DIR/RECIPE/seed_K.json) exist from an earlier run with
the same command is not trained again, and its scores are reused when the sampling settings
match too: with a fixed --out_dir, a second --candidate retrains only the candidate.
Training runs with CFG_JAX_COMPILATION_CACHE=0 (unless --compilation_cache), so every seed
pays compilation as a first run does and the recipes' wall times compare alike.

--quick: configs/digits_tiny.py (4 training steps), one seed, 50 samples per row, the
compilation cache on, and a 60-step evaluation network of its own (in OUT_DIR/evalnet_quick): its scores mean nothing,
it only checks that every part runs (about 1 to 2 minutes on 2 CPU cores, less with the
compiled programs cached). After 4 steps the ε-network's zero-initialised output layer
has barely moved, so its label hardly matters and the four γ rows coincide.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

from cfg_jax import errors
from cfg_jax.app import startup

import machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # config files import their siblings (`from configs import digits`)

_RECIPE = flags.DEFINE_string("recipe", "configs/digits.py", "The recipe's config file.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "A config override X=Y (as "
                                      "--config.X=Y of train.py), for both recipes.")
_CANDIDATE = flags.DEFINE_multi_string("candidate", [], "The candidate's override X=Y, on "
                                       "top of --override; compares it with the baseline.")
_CANDIDATE_RECIPE = flags.DEFINE_string("candidate_recipe", None, "The candidate's config file "
                                        "(default: --recipe); compares it with the baseline.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (config.seed).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1000, "Samples per row.")
_BATCH = flags.DEFINE_integer("batch_size", 500, "Images per scale in a compiled call.")
_SAMPLING_STEPS = flags.DEFINE_integer("sampling_steps", 50, "DDIM steps.")
_OUT = flags.DEFINE_string("out_dir", None, "Workdirs, logs and tables (default: a new "
                           "temporary folder).")
_JSON = flags.DEFINE_string("json", None, "Also write every number to this JSON file.")
_EVALNET_DIR = flags.DEFINE_string("evalnet_dir", None, "The evaluation network's folder "
                                   "(default: sweep.py's, in the user cache).")
_CACHE = flags.DEFINE_bool("compilation_cache", False, "Let training use the persistent "
                           "compilation cache (faster; wall times then favour later recipes).")
_QUICK = flags.DEFINE_bool("quick", False, "A tiny run that checks the script works.")

SAMPLING_SEED = 0
# (name, classifier-free γ, classifier scale s); the classifier rows guide γ = 0.
ROWS = (("CFG γ = 0", 0.0, 0.0), ("CFG γ = 1", 1.0, 0.0), ("CFG γ = 1.5", 1.5, 0.0),
        ("CFG γ = 3", 3.0, 0.0), ("classifier s = 1", 0.0, 1.0),
        ("classifier s = 3", 0.0, 3.0), ("classifier s = 10", 0.0, 10.0))
# (key, heading, +1 if higher is better else −1, format)
METRICS = (("accuracy", "accuracy ↑", +1, "{:.3f}"), ("fid", "FID ↓", -1, "{:.1f}"),
           ("pixel_fid", "pixel FID ↓", -1, "{:.2f}"), ("kid", "KID ↓", -1, "{:.3f}"),
           ("precision", "precision ↑", +1, "{:.3f}"), ("recall", "recall ↑", +1, "{:.3f}"))
WORSE, BETTER = "✗", "✓"


# Recipes ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recipe:
  name: str  # "baseline" or "candidate": its folder under --out_dir
  config_file: str
  overrides: tuple[str, ...]  # "train.num_steps=2000", in the order given
  config: object  # the resolved ml_collections.ConfigDict

  def train_args(self, seed: int, workdir: str) -> list[str]:
    """train.py's arguments for one seed (the seed goes last, so it wins)."""
    return [f"--config={self.config_file}", *(f"--config.{o}" for o in self.overrides),
            f"--config.seed={seed}", f"--workdir={workdir}"]


def normalize_override(text: str) -> str:
  """"X=Y" from "X=Y", "config.X=Y" or "--config.X=Y"."""
  for prefix in ("--config.", "-config.", "config."):
    if text.startswith(prefix):
      text = text[len(prefix):]
      break
  if "=" not in text or not text.split("=", 1)[0]:
    raise errors.InputError(f"a config override must read FIELD=VALUE (e.g. "
                            f"train.num_steps=2000), got {text!r}.")
  return text


def resolve_config(config_file: str, overrides) -> object:
  """The ConfigDict train.py would build from `config_file` and `--config.X=Y` overrides,
  parsed by ml_collections exactly as train.py's flag does, then checked as train.py does."""
  from ml_collections import config_flags

  from cfg_jax.app import config_checks

  argv = ["recipe", f"--config={config_file}", *(f"--config.{o}" for o in overrides)]
  holder = flags.FlagValues()  # a private set of flags: this script's own stay untouched
  config_flags.DEFINE_config_file("config", None, flag_values=holder, lock_config=True,
                                  sys_argv=argv)
  try:
    holder(argv)
    config = holder.config
    config.get("seed")  # a file that failed to load raises only on first use
  except OSError as e:
    raise errors.ConfigError(f"cannot load the recipe {config_file!r}: "
                             f"{str(e).splitlines()[-1].strip()}") from None
  except (AttributeError, KeyError) as e:  # ml_collections: a field that is not there
    field = str(e).strip("\"'")
    raise errors.ConfigError(f"the recipe {config_file} has no field {field!r} (overrides: "
                             f"{' '.join(overrides)}); see the file for its fields.") from None
  except flags.Error as e:  # a value of the wrong type
    raise errors.ConfigError(f"bad override for {config_file}: {e}") from None
  config_checks.validate(config)
  if config.diffusion.p_uncond == 0:  # the CFG γ = 0 row and the classifier rows need ∅
    raise errors.ConfigError(f"the recipe {config_file} trains no null label "
                             "(diffusion.p_uncond=0), and the table's γ = 0 and classifier "
                             "rows need one; score such a model with sweep.py --guidance icg.")
  return config


def parse_seeds(values) -> list[int]:
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise errors.InputError(f"--seeds must be integers, got {','.join(values)!r}.") from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise errors.InputError(f"--seeds must be distinct, at least one, got {seeds}.")
  return seeds


def recipes_from_flags() -> list[Recipe]:
  """The baseline and, when asked for, the candidate."""
  shared = tuple(normalize_override(o) for o in _OVERRIDE.value)
  found = [Recipe("baseline", _RECIPE.value, shared, resolve_config(_RECIPE.value, shared))]
  if _CANDIDATE.value or _CANDIDATE_RECIPE.value:
    config_file = _CANDIDATE_RECIPE.value or _RECIPE.value
    overrides = shared + tuple(normalize_override(o) for o in _CANDIDATE.value)
    found.append(Recipe("candidate", config_file, overrides,
                        resolve_config(config_file, overrides)))
    if found[1].config.data.name != found[0].config.data.name:
      raise errors.InputError("the baseline and the candidate train on different data sets "
                              f"({found[0].config.data.name}, {found[1].config.data.name}); "
                              "their scores would not compare.")
  return found


# Training -------------------------------------------------------------------------------------


def train_seed(recipe: Recipe, seed: int, out_dir: str) -> dict:
  """Trains one seed with train.py in a subprocess, or reuses an earlier identical run.

  Returns its record: {"seed", "workdir", "command", "wall_seconds"} (+ "scores" if reused).
  """
  workdir = os.path.join(out_dir, recipe.name, f"seed_{seed}")
  record_path = workdir + ".json"
  command = ["train.py", *recipe.train_args(seed, workdir)]
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if record["command"] == command and os.path.isdir(workdir):
      print(f"{recipe.name} seed {seed}: reusing {workdir} (trained in "
            f"{record['wall_seconds']:.0f} s)", flush=True)
      return record
  if os.path.exists(workdir):  # a resumed run's wall time would cover only its last part
    raise errors.InputError(f"{workdir} holds a training this script did not finish (or one "
                            "of another recipe); remove it or choose another --out_dir.")
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  env = dict(os.environ)
  if not _CACHE.value:
    env["CFG_JAX_COMPILATION_CACHE"] = "0"
  log_path = workdir + ".train.log"
  print(f"{recipe.name} seed {seed}: python {' '.join(command)}", flush=True)
  start = time.perf_counter()
  with open(log_path, "w") as log:
    done = subprocess.run([sys.executable, os.path.join(REPO, command[0]), *command[1:]],
                          stdout=log, stderr=subprocess.STDOUT, env=env, check=False)
  wall = time.perf_counter() - start
  if done.returncode != 0:
    with open(log_path) as f:
      tail = "".join(f.readlines()[-15:])
    sys.exit(f"error: training {recipe.name} seed {seed} failed (exit {done.returncode}); the "
             f"end of {log_path}:\n{tail}")
  print(f"{recipe.name} seed {seed}: trained in {wall:.0f} s", flush=True)
  record = {"seed": seed, "workdir": workdir, "command": command, "wall_seconds": wall}
  write_json(record_path, record)
  return record


# Metrics that cfg_jax.evaluation lacks --------------------------------------------------------


def kid(real_features: np.ndarray, fake_features: np.ndarray) -> float:
  """Kernel Inception Distance (Bińkowski et al. 2018): the unbiased estimate of MMD² under
  the cubic polynomial kernel k(x, y) = (x·y/d + 1)³, d the feature dimension.

  Taken over the whole sets at once rather than averaged over subsets as the paper does for
  large sets (360 test images against 1,000 samples is small). Unbiased, so equal
  distributions score 0 in expectation and a value can be slightly negative.
  """
  x = np.asarray(real_features, np.float64)
  y = np.asarray(fake_features, np.float64)
  d = x.shape[1]

  def mean_off_diagonal(a):
    k = (a @ a.T / d + 1.0) ** 3
    return (k.sum() - np.trace(k)) / (len(a) * (len(a) - 1))

  cross = ((x @ y.T / d + 1.0) ** 3).mean()
  return float(mean_off_diagonal(x) + mean_off_diagonal(y) - 2.0 * cross)


def pixel_fid(real_uint8: np.ndarray, fake_uint8: np.ndarray) -> float:
  """FID with the raw pixels as features: the Fréchet distance between Gaussians fitted to
  the flattened images (8×8×1 = 64 values for digits) scaled to [−1, 1], the model's range.
  Needs no network, so it cannot be fooled by one; it sees only low-order pixel statistics."""
  from cfg_jax import images
  from cfg_jax.evaluation import metrics

  flat = [images.from_uint8(x).reshape(len(x), -1) for x in (real_uint8, fake_uint8)]
  return metrics.fid(*flat)


# Sampling and scoring -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Judge:
  """The evaluation network and the real data that every row is scored against."""
  net: object  # cfg_jax.evaluation.evalnet.EvalNet
  directory: str
  test: object  # data.Split
  train: object
  test_uint8: np.ndarray  # the test split as samples are: uint8, so quantised alike
  test_features: np.ndarray

  @classmethod
  def load(cls, config, out_dir: str) -> "Judge":
    from cfg_jax import data, images
    from cfg_jax.evaluation import evalnet

    name, data_dir = config.data.name, config.data.data_dir or None
    directory = _EVALNET_DIR.value or (os.path.join(out_dir, "evalnet_quick") if _QUICK.value
                                       else evalnet.default_directory(name))
    net = evalnet.load_or_train(name, directory, data_dir,
                                **({"num_steps": 60} if _QUICK.value else {}))
    test, train = (data.load_split(name, s, data_dir) for s in ("test", "train"))
    test_uint8 = images.to_uint8(test.images)
    return cls(net, directory, test, train, test_uint8, net(test_uint8)[1])

  def score(self, samples: np.ndarray, labels: np.ndarray) -> dict:
    """The library's metrics of one sample set, plus KID and pixel FID."""
    from cfg_jax.evaluation import evaluate

    scores = evaluate(samples, labels, self.net, self.test, self.train)
    scores["kid"] = kid(self.test_features, self.net(samples)[1])
    scores["pixel_fid"] = pixel_fid(self.test_uint8, samples)
    return scores


def draw_rows(workdir: str, num_samples: int):
  """Yields (row name, γ, s, uint8 samples, labels) for every row that the model can run."""
  import jax

  import cfg_jax
  from cfg_jax import sharded_sampling
  from cfg_jax.app import sample_job

  model = cfg_jax.load(workdir)
  labels = sample_job.balanced_labels(num_samples, model.num_classes)
  options = dict(method="ddim", num_steps=_SAMPLING_STEPS.value, eta=0.0,
                 batch_size=min(_BATCH.value, num_samples))
  key = jax.random.key(SAMPLING_SEED)
  cfg_rows = [row for row in ROWS if row[2] == 0]
  # Every γ in one compiled call per batch, from the same x_T (as sweep.py samples).
  swept = sharded_sampling.sample_batches(
      key, model, labels, guidance_scale=np.array([g for _, g, _ in cfg_rows], np.float32),
      **options)
  for (name, gamma, s), samples in zip(cfg_rows, swept):
    yield name, gamma, s, samples, labels
  if model.classifier_fn is None:  # config.classifier.num_steps = 0: no classifier rows
    return
  for name, gamma, s in (row for row in ROWS if row[2] != 0):
    yield name, gamma, s, sharded_sampling.sample_batches(
        key, model, labels, guidance_scale=gamma, classifier_scale=s, **options), labels


def score_seed(record: dict, judge: Judge, settings: dict) -> dict:
  """The record with "scores": {"settings", "rows", "seconds"}, reusing equal earlier ones."""
  if record.get("scores", {}).get("settings") == settings:
    return record
  start = time.perf_counter()
  rows = []
  for name, gamma, s, samples, labels in draw_rows(record["workdir"], settings["num_samples"]):
    rows.append({"row": name, "guidance_scale": gamma, "classifier_scale": s,
                 **judge.score(samples, labels)})
  record = {**record, "scores": {"settings": settings, "rows": rows,
                                 "seconds": time.perf_counter() - start}}
  print(f"  sampled and scored {len(rows)} rows in {record['scores']['seconds']:.0f} s",
        flush=True)
  write_json(record["workdir"] + ".json", record)
  return record


# Summaries and comparison ---------------------------------------------------------------------


def spread(values) -> dict:
  values = [float(v) for v in values]
  return {"mean": float(np.mean(values)), "min": min(values), "max": max(values),
          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0, "values": values}


def summarize(records: list[dict]) -> dict:
  """{"rows": [{"row": name, metric: spread over seeds}], "wall_seconds": spread}."""
  by_row = {}
  for record in records:
    for row in record["scores"]["rows"]:
      by_row.setdefault(row["row"], []).append(row)
  rows = [{"row": name, **{key: spread(r[key] for r in seeds) for key, *_ in METRICS}}
          for name, seeds in by_row.items()]
  return {"rows": rows, "wall_seconds": spread(r["wall_seconds"] for r in records)}


def verdict(base: dict, cand: dict, sign: int) -> str:
  """WORSE when every candidate seed is worse than every baseline seed, BETTER for the
  mirror case, else "". `sign` is +1 where higher is better, -1 where lower is. With one
  seed each there is no spread, so any difference is marked."""
  # In "higher is better" units, the two min–max ranges must not overlap.
  base_lo, base_hi = sorted((sign * base["min"], sign * base["max"]))
  cand_lo, cand_hi = sorted((sign * cand["min"], sign * cand["max"]))
  if cand_hi < base_lo:
    return WORSE
  if cand_lo > base_hi:
    return BETTER
  return ""


def compare(baseline: dict, candidate: dict) -> dict:
  """Row by row: {metric: {"delta": candidate mean − baseline mean, "mark"}}."""
  cand_rows = {r["row"]: r for r in candidate["rows"]}
  rows = []
  for base in baseline["rows"]:
    cand = cand_rows.get(base["row"])
    if cand is None:
      continue
    rows.append({"row": base["row"], **{key: _difference(base[key], cand[key], sign, fmt)
                                        for key, _, sign, fmt in METRICS}})
  wall = _difference(baseline["wall_seconds"], candidate["wall_seconds"], -1, "{:.0f}")
  return {"rows": rows, "wall_seconds": wall}


def _difference(base: dict, cand: dict, sign: int, fmt: str) -> dict:
  """{"delta", "mark"}; a delta that the table shows as 0 is never marked (one seed each
  has no spread, and a mark on "+0.0" would only be noise)."""
  delta = cand["mean"] - base["mean"]
  shown_as_zero = float(fmt.format(abs(delta))) == 0
  return {"delta": delta, "mark": "" if shown_as_zero else verdict(base, cand, sign)}


# Markdown -------------------------------------------------------------------------------------


def _cell(stats: dict, fmt: str) -> str:
  if stats["min"] == stats["max"]:
    return fmt.format(stats["mean"])
  return f"{fmt.format(stats['mean'])} ({fmt.format(stats['min'])}–{fmt.format(stats['max'])})"


def _header(first: str) -> list[str]:
  head = (first, *(heading for _, heading, _, _ in METRICS))
  return ["| " + " | ".join(head) + " |", "|---|" + "---:|" * len(METRICS)]


def recipe_markdown(recipe: Recipe, summary: dict, seeds) -> str:
  overrides = " ".join(f"--config.{o}" for o in recipe.overrides) or "(no overrides)"
  lines = [f"**{recipe.name}**: `{recipe.config_file}` {overrides}; seeds "
           f"{', '.join(map(str, seeds))}: mean (min–max)", "", *_header("row")]
  for row in summary["rows"]:
    lines.append("| " + " | ".join([row["row"], *(_cell(row[key], fmt)
                                                   for key, _, _, fmt in METRICS)]) + " |")
  wall = summary["wall_seconds"]
  lines += ["", "main job wall time per seed: " + ", ".join(f"{v:.0f} s" for v in wall["values"])
            + f" (mean {wall['mean']:.0f} s)"]
  return "\n".join(lines)


def _signed(value: float, fmt: str) -> str:
  text = fmt.format(value)
  return text if text.startswith("-") else "+" + text


def difference_markdown(diff: dict) -> str:
  lines = ["**candidate − baseline** (difference of the means; "
           f"{WORSE}: worse beyond the seed spread, every candidate seed worse than every "
           f"baseline seed; {BETTER}: better beyond it)", "", *_header("row")]
  for row in diff["rows"]:
    cells = [(_signed(row[key]["delta"], fmt) + f" {row[key]['mark']}").strip()
             for key, _, _, fmt in METRICS]
    lines.append("| " + " | ".join([row["row"], *cells]) + " |")
  wall = diff["wall_seconds"]
  lines += ["", f"main job wall time: {_signed(wall['delta'], '{:.0f}')} s {wall['mark']}".strip()]
  return "\n".join(lines)


# Main -------------------------------------------------------------------------------------------


def write_json(path: str, value) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2, ensure_ascii=False, default=str)
  os.replace(path + ".tmp", path)  # never half-written


def _apply_quick_defaults() -> None:
  quick = {"recipe": "configs/digits_tiny.py", "seeds": ["0"], "num_samples": 50,
           "batch_size": 50, "compilation_cache": True}
  for name, value in quick.items():
    if not flags.FLAGS[name].present:
      flags.FLAGS[name].value = value


def main(argv):
  startup.start(argv)  # as the entry points: XLA flags, compilation cache, quiet console
  started = time.perf_counter()
  if _QUICK.value:
    _apply_quick_defaults()
  recipes = startup.run_or_exit(recipes_from_flags)  # every recipe checked before training
  seeds = startup.run_or_exit(lambda: parse_seeds(_SEEDS.value))
  out_dir = os.path.abspath(_OUT.value or tempfile.mkdtemp(prefix="recipe_table-"))
  os.makedirs(out_dir, exist_ok=True)
  print(machine.describe())
  print(f"outputs in {out_dir}", flush=True)
  judge = startup.run_or_exit(lambda: Judge.load(recipes[0].config, out_dir))
  settings = {"num_samples": _NUM_SAMPLES.value, "batch_size": _BATCH.value,
              "method": "ddim", "sampling_steps": _SAMPLING_STEPS.value, "eta": 0.0,
              "sampling_seed": SAMPLING_SEED, "rows": [list(r) for r in ROWS],
              "evalnet": judge.directory, "evalnet_test_accuracy": judge.net.test_accuracy}
  results = {}
  for recipe in recipes:
    records = []
    for seed in seeds:
      record = startup.run_or_exit(lambda: train_seed(recipe, seed, out_dir))
      records.append(score_seed(record, judge, settings))
    results[recipe.name] = {"config_file": recipe.config_file,
                            "overrides": list(recipe.overrides),
                            "config": recipe.config.to_dict(), "seeds": records,
                            "summary": summarize(records)}
  sections = [f"{settings['num_samples']} samples per row, DDIM {settings['sampling_steps']} "
              f"steps, sampling seed {SAMPLING_SEED}; evaluation network {judge.directory} "
              f"(test accuracy {judge.net.test_accuracy:.3f})"]
  sections += [recipe_markdown(r, results[r.name]["summary"], seeds) for r in recipes]
  everything = {"machine": machine.describe(), "settings": settings, "recipes": results}
  if len(recipes) == 2:
    everything["difference"] = compare(results["baseline"]["summary"],
                                       results["candidate"]["summary"])
    sections.append(difference_markdown(everything["difference"]))
  text = "\n\n".join(sections)
  everything.update(markdown=text, load=machine.load(),
                    seconds=time.perf_counter() - started)
  print("\n" + text + "\n")
  with open(os.path.join(out_dir, "table.md"), "w") as f:
    f.write(text + "\n")
  write_json(os.path.join(out_dir, "table.json"), everything)
  if _JSON.value:
    write_json(_JSON.value, everything)
  print(f"{everything['seconds']:.0f} s in all; tables in {out_dir}/table.{{md,json}}")
  print(everything["load"])


if __name__ == "__main__":
  app.run(main)
