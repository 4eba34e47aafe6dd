"""Training and sampling throughput of one config on N devices (the README's scaling table).

  for n in 1 2 4; do
    XLA_FLAGS=--xla_force_host_platform_device_count=$n JAX_PLATFORMS=cpu \\
        python benchmarks/scaling.py --config configs/digits.py
  done

Training: `loop.fit`'s jitted step over a mesh of every device (batch sharded), dispatched
as `loop.run_loop` does (one step in flight on several CPU devices of one process).
Sampling: `generate.generate` (DDIM, γ = 3), the batch sharded the same way. Untrained
weights: speed does not depend on them. Prints one JSON line.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from absl import app, flags
from jax.tree_util import Partial
from ml_collections import config_flags

from cfg_jax import data, generate, models, pipeline, schedules
from cfg_jax.train import diffusion as diffusion_training
from cfg_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"))
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 10, "Timed training steps.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 64, "Sampling batch size.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 10, "DDIM steps per sample.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed sampling calls (best is kept).")


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = loop.data_mesh()
  split = data.load_split(config.data.name, "train")
  graphdef, params = diffusion_training.create_unet(config, config.seed)
  tx = loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps)
  step = loop.jit_data_parallel(
      diffusion_training.make_train_step(graphdef, tx, schedules.from_config(config.diffusion),
                                         config), mesh)
  # As in training: on several CPU devices of one process, queued steps can deadlock.
  step = loop.one_step_in_flight(step, mesh)
  state = loop.replicate(loop.init_state(params, tx, with_ema=True), mesh)
  batches = data.batches(split, config.train.batch_size, config.seed)
  key = jax.random.key(0)
  for _ in range(3):  # compile, and let the allocator settle
    state, _ = step(state, loop.shard_batch(next(batches), mesh), key)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(_TRAIN_STEPS.value):
    state, metrics = step(state, loop.shard_batch(next(batches), mesh), key)
  jax.block_until_ready(metrics)
  train_ips = _TRAIN_STEPS.value * config.train.batch_size / (time.perf_counter() - start)

  model = pipeline.Pipeline.from_config(config, Partial(models.apply, graphdef, state.ema_params))
  labels = np.arange(_SAMPLE_BATCH.value) % model.num_classes
  run = lambda: generate.generate(jax.random.key(1), model, labels, mesh=mesh,
                                  batch_size=_SAMPLE_BATCH.value, guidance_scale=3.0,
                                  num_steps=_SAMPLE_STEPS.value)
  run()  # compile
  best = float("inf")
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - start)
  print(json.dumps({"devices": jax.device_count(), "cpu_cores": os.cpu_count(),
                    "batch": config.train.batch_size, "train_images_per_s": round(train_ips, 1),
                    "sample_batch": _SAMPLE_BATCH.value, "ddim_steps": _SAMPLE_STEPS.value,
                    "sample_images_per_s": round(_SAMPLE_BATCH.value / best, 1)}))


if __name__ == "__main__":
  app.run(main)
