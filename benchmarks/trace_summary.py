"""Where a training step and a CFG sampler step spend their time: a jax.profiler trace, summed.

  python benchmarks/trace_summary.py            # default config, batch 64 / CFG batch 256
  python benchmarks/trace_summary.py --quick    # 3 train steps, 2 sampler steps at batch 16
  python benchmarks/trace_summary.py --steps=50

Runs the project's own paths (the data-parallel train step fed by `data.batches` as
`cfg_jax.train.loop.run_loop` feeds it, and `cfg_jax.sharded_sampling.sample_sharded` as
sample.py calls it) under `jax.profiler.trace`, then sums the trace's XLA events by kind:
convolutions (YNNPACK fusions rooted at a convolution), other YNNPACK fusions (reductions,
dots), XLA's own fusions (elementwise: GroupNorm, SiLU, the optimizer), collectives and
copies, each in ms per step and as a share of the XLA op time. It also prints the host
side: Python dispatch of each step (`PjitFunction`) and the batch preparation, against the
wall time per step. The README's trace summary comes from here.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

from cfg_jax import data, distributed, models, pipeline, schedules, sharded_sampling
from cfg_jax.app import startup, xla_flags
from cfg_jax.train import denoiser, loop

import jax
import numpy as np
from absl import app, flags
from jax.tree_util import Partial
from ml_collections import config_flags

import machine

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"))
_STEPS = flags.DEFINE_integer("steps", 30, "Training steps traced (after a warm-up).")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 256, "CFG sampling batch.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 10, "DDIM steps traced.")
_QUICK = flags.DEFINE_bool("quick", False, "3 train steps and 2 sampler steps at batch 16: "
                           "checks that it runs, not a measurement.")


def _fusion_roots(dump_folder: str) -> dict:
  """(HLO module, fusion name) → the opcode at the fused computation's root, read from the
  optimised HLO that XLA dumped (`--xla_dump_to`)."""
  roots = {}
  for path in glob.glob(os.path.join(dump_folder, "*after_optimizations.txt")):
    module = re.match(r"module_\d+\.(.+?)\.\w+_after_optimizations\.txt",
                      os.path.basename(path))
    text = open(path).read()
    computation_root, current = {}, None
    for line in text.splitlines():
      header = re.match(r"^%?([\w.\-]+) .*\{\s*$", line)
      if header:
        current = header.group(1)
      elif current and line.strip().startswith("ROOT"):
        opcode = re.search(r"= \S+ ([\w\-]+)\(", line)
        computation_root[current] = opcode.group(1) if opcode else "?"
    for match in re.finditer(r"%([\w.\-]+) = [^\n]*? fusion\([^\n]*?calls=%([\w.\-]+)", text):
      roots[(module.group(1) if module else "", match.group(1))] = \
          computation_root.get(match.group(2), "?")
  return roots


def _kind(event: dict, roots: dict) -> str:
  base = event["name"].split(" ")[0]
  if base.startswith("ynn_fusion"):
    root = roots.get((event.get("args", {}).get("hlo_module"), base))
    return "convolutions (YNNPACK)" if root == "convolution" else \
        "reductions and dots (YNNPACK)"
  if re.match(r"(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)", base):
    return "collectives (all-reduce of the gradients, gathers)"
  if "fusion" in base:
    return "elementwise fusions (GroupNorm, SiLU, optimizer, ...)"
  if base in ("copy", "transpose") or base.startswith(("copy", "transpose")):
    return "copies"
  return ""


def _traced(fn) -> tuple[float, collections.Counter, float]:
  """Runs `fn` under the profiler: (wall s, seconds per kind, seconds of Python dispatch)."""
  roots = _fusion_roots(_DUMP_FOLDER)
  folder = tempfile.mkdtemp(prefix="cfg_jax_trace_")
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0  # tracing every Python call would slow the host side 5×
  with jax.profiler.trace(folder, create_perfetto_trace=True, profiler_options=options):
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start  # the profiler's start and export left out
  path = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)[0]
  with gzip.open(path) as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  kinds, dispatch = collections.Counter(), 0.0
  for e in events:
    if e["name"].startswith("PjitFunction"):
      dispatch += e["dur"] / 1e6
    kind = _kind(e, roots)
    if kind:
      kinds[kind] += e["dur"] / 1e6
  return wall, kinds, dispatch


def _report(title: str, per: int, wall: float, kinds: collections.Counter, host: str) -> None:
  busy = sum(kinds.values())
  print(f"\n{title}: {wall / per * 1e3:.1f} ms per step wall; XLA ops {busy / per * 1e3:.1f} "
        f"ms per step, summed over {jax.device_count()} device(s); {host}")
  for kind, seconds in kinds.most_common():
    print(f"  {kind:52s} {seconds / per * 1e3:7.1f} ms  {100 * seconds / busy:5.1f}%")


def trace_training(config) -> None:
  mesh = distributed.data_mesh()
  split = data.load_split(config.data.name, "train")
  graphdef, params = denoiser.create_denoiser(config, 0)
  tx = loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps)
  state = distributed.replicate_tree(loop.init_state(params, tx, with_ema=True), mesh)
  step_fn = loop.one_step_in_flight(loop.jit_data_parallel(
      denoiser.make_train_step(graphdef, tx, schedules.from_config(config.diffusion), config),
      mesh), mesh)
  batches = data.batches(split, config.train.batch_size, seed=0)
  key = jax.random.key(0)
  prepare_s = [0.0]

  def run(state, n):
    for i in range(n):
      start = time.perf_counter()
      batch = loop.shard_batch(next(batches), mesh)
      prepare_s[0] += time.perf_counter() - start
      state, metrics = step_fn(state, batch, jax.random.fold_in(key, i))
    jax.block_until_ready(metrics)
    return state

  state = run(state, 3)  # compile and warm up
  prepare_s[0] = 0.0
  holder = {"state": state}
  steps = 3 if _QUICK.value else _STEPS.value
  wall, kinds, dispatch = _traced(lambda: holder.update(state=run(holder["state"], steps)))
  _report(f"train step, batch {config.train.batch_size}", steps, wall, kinds,
          f"host: Python dispatch {dispatch / steps * 1e3:.2f} ms and batch preparation "
          f"{prepare_s[0] / steps * 1e3:.2f} ms per step")


def trace_sampling(config) -> None:
  graphdef, params = denoiser.create_denoiser(config, 0)
  model = pipeline.Pipeline.from_config(config, Partial(models.apply, graphdef, params))
  labels = np.arange(16 if _QUICK.value else _SAMPLE_BATCH.value) % model.num_classes
  steps = 2 if _QUICK.value else _SAMPLE_STEPS.value

  def run():
    sharded_sampling.sample_sharded(jax.random.key(0), model, labels, method="ddim",
                                    num_steps=steps, guidance_scale=3.0,
                                    timestep_spacing="trailing")

  run()  # compile
  wall, kinds, dispatch = _traced(run)
  _report(f"CFG DDIM step, batch {len(labels)} (one batched 2B pass)", steps, wall, kinds,
          f"host: one dispatch per call of {steps} steps (one lax.scan)")


def main(argv):
  del argv
  startup.tune_allocator()
  config = _CONFIG.value
  print(machine.describe())
  trace_training(config)
  trace_sampling(config)
  print(machine.load())


# XLA writes each optimised program here, to tell the convolutions among its fusions.
_DUMP_FOLDER = tempfile.mkdtemp(prefix="cfg_jax_hlo_")

if __name__ == "__main__":
  xla_flags.configure()  # before JAX starts its backend, as the entry points do
  os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={_DUMP_FOLDER} "
                             "--xla_dump_hlo_as_text").strip()
  app.run(main)
