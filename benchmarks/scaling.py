"""Training and sampling throughput of one config on N devices (the README's scaling table).

  XLA_FLAGS=--xla_force_host_platform_device_count=1 JAX_PLATFORMS=cpu \\
      python benchmarks/scaling.py --config configs/digits.py | tee /tmp/scaling_1.json
  for n in 2 4; do
    XLA_FLAGS=--xla_force_host_platform_device_count=$n JAX_PLATFORMS=cpu \\
        python benchmarks/scaling.py --config configs/digits.py --baseline /tmp/scaling_1.json
  done
  python benchmarks/scaling.py --quick          # the devices JAX sees; checks that it runs

Measures, on a mesh of every device JAX sees (forced CPU devices as above, or the GPUs of
one host): training images/s of the jitted data-parallel step (batch sharded), dispatched as
`cfg_jax.train.loop.run_loop` does (one step in flight on several CPU devices of one
process), and sampling images/s of `cfg_jax.sharded_sampling.sample_batches` (DDIM, γ = 3),
the batch sharded the same way. Run it once per device count and divide the images/s by
the one-device run's for the speed-up: with --baseline (the JSON line of an earlier run, e.g.
on one device) the line holds those ratios too. Untrained weights: speed does not depend on
them. Prints one JSON line that names the machine.
"""

import json
import os
import time

import jax
import numpy as np
from absl import app, flags
from jax.tree_util import Partial
from ml_collections import config_flags

from cfg_jax import data, distributed, models, pipeline, schedules, sharded_sampling
from cfg_jax.app import startup, xla_flags
from cfg_jax.train import denoiser, loop

import machine

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"))
_QUICK = flags.DEFINE_bool("quick", False, "2 training steps, 2 DDIM steps at batch 16, one "
                           "repeat: checks that it runs, not a measurement.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "Timed training steps.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 64, "Sampling batch size.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 10, "DDIM steps per sample.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed sampling calls (best is kept).")
_BASELINE = flags.DEFINE_string("baseline", None, "A file holding this script's JSON line of "
                                "an earlier run (e.g. one device): report speed-ups over it.")


def main(argv):
  del argv
  startup.tune_allocator()  # as the entry points do
  quick = _QUICK.value
  train_steps = 2 if quick else _TRAIN_STEPS.value
  sample_batch = 16 if quick else _SAMPLE_BATCH.value
  sample_steps = 2 if quick else _SAMPLE_STEPS.value
  repeats = 1 if quick else _REPEATS.value
  config = _CONFIG.value
  mesh = distributed.data_mesh()
  split = data.load_split(config.data.name, "train")
  graphdef, params = denoiser.create_denoiser(config, config.seed)
  tx = loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps)
  step = loop.jit_data_parallel(
      denoiser.make_train_step(graphdef, tx, schedules.from_config(config.diffusion), config),
      mesh)
  # As in training: on several CPU devices of one process, queued steps can deadlock.
  step = loop.one_step_in_flight(step, mesh)
  state = distributed.replicate_tree(loop.init_state(params, tx, with_ema=True), mesh)
  batches = data.batches(split, config.train.batch_size, config.seed)
  key = jax.random.key(0)
  for _ in range(3):  # compile, and let the allocator settle
    state, _ = step(state, loop.shard_batch(next(batches), mesh), key)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(train_steps):
    state, metrics = step(state, loop.shard_batch(next(batches), mesh), key)
  jax.block_until_ready(metrics)
  train_ips = train_steps * config.train.batch_size / (time.perf_counter() - start)

  model = pipeline.Pipeline.from_config(config, Partial(models.apply, graphdef, state.ema_params))
  labels = np.arange(sample_batch) % model.num_classes
  run = lambda: sharded_sampling.sample_batches(
      jax.random.key(1), model, labels, mesh=mesh, batch_size=sample_batch, method="ddim",
      guidance_scale=3.0, num_steps=sample_steps,
      timestep_spacing="trailing" if quick else None)  # 2 "leading" steps start far from noise
  run()  # compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - start)
  row = {"machine": machine.describe().removeprefix("machine: "), "devices": jax.device_count(),
         "cpu_cores": os.cpu_count(), "batch": config.train.batch_size,
         "train_images_per_s": round(train_ips, 1), "sample_batch": sample_batch,
         "ddim_steps": sample_steps, "sample_images_per_s": round(sample_batch / best, 1),
         "load_average": round(os.getloadavg()[0], 2)}
  if _BASELINE.value:
    with open(_BASELINE.value) as f:
      base = json.loads(f.read().strip().splitlines()[-1])
    row["baseline_devices"] = base["devices"]
    for what in ("train", "sample"):
      row[f"{what}_speed_up"] = round(row[f"{what}_images_per_s"] /
                                      base[f"{what}_images_per_s"], 2)
  print(json.dumps(row))


if __name__ == "__main__":
  xla_flags.configure()  # before JAX starts its backend; a device count in XLA_FLAGS is kept
  app.run(main)
