"""Training and sampling throughput, guided-step costs and compile times of one config.

  python benchmarks/bench_digits.py                       # configs/digits.py
  python benchmarks/bench_digits.py --quick               # seconds after compiling
  python benchmarks/bench_digits.py --config.model.base_channels=64

Measures, on whatever devices JAX sees and on the paths train.py and sample.py take (the
batch split over every device): the data-parallel training step's compile time and
images/s at the config's batch size; then DDIM sampling (--sample_steps steps, batch
--sample_batch) unguided, with classifier-free guidance (γ = 3, one batched 2B pass) and
with classifier guidance (s = 1 on γ = 0): compile + first call, images/s, ms per step, and
each as a ratio to the unguided step. Untrained weights: speed does not depend on them.
"""

import os
import time

import jax
import numpy as np
from absl import app, flags
from jax.tree_util import Partial
from ml_collections import config_flags

from cfg_jax import data, distributed, models, pipeline, schedules, sharded_sampling
from cfg_jax.app import startup, xla_flags
from cfg_jax.train import classifier, denoiser, loop

import machine

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"))
_QUICK = flags.DEFINE_bool("quick", False, "5 training steps, sampling batch 32 with 5 "
                           "steps, 1 repeat: checks that it runs, not a measurement.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 50, "Timed training steps.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 256, "Sampling batch size.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "DDIM steps per sampling call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats of each sampling call.")


def _timed(fn, repeats):
  """(first-call seconds incl. compile, best steady-state seconds)."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return first, best


def bench_training(config, steps):
  mesh = distributed.data_mesh()
  spec = data.spec(config.data.name)
  graphdef, params = denoiser.create_denoiser(config, 0)
  tx = loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps)
  state = distributed.replicate_tree(loop.init_state(params, tx, with_ema=True), mesh)
  step = loop.one_step_in_flight(loop.jit_data_parallel(
      denoiser.make_train_step(graphdef, tx, schedules.from_config(config.diffusion), config),
      mesh), mesh)  # as loop.fit runs it
  rng = np.random.default_rng(0)
  b = config.train.batch_size
  batch = loop.shard_batch({
      "image": rng.uniform(-1, 1, (b, *spec.image_shape)).astype(np.float32),
      "label": rng.integers(0, spec.num_classes, b).astype(np.int32)}, mesh)
  start = time.perf_counter()
  state, metrics = step(state, batch, jax.random.key(0))
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch, jax.random.key(0))
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  print(f"UNet parameters:               {models.count_params(params):,}")
  print(f"train step compile (s):        {compile_s:.1f}")
  print(f"train images/s (batch {b}):    {steps * b / seconds:.0f}")
  return graphdef, state.ema_params


def bench_sampling(config, graphdef, params, batch, num_steps, repeats, spacing=None):
  cls_graphdef, cls_params = classifier.create_classifier(config, 0)
  model = pipeline.Pipeline.from_config(config, Partial(models.apply, graphdef, params),
                                        Partial(models.apply, cls_graphdef, cls_params))
  labels = np.arange(batch) % model.num_classes

  def run(**kw):
    return lambda: sharded_sampling.sample_sharded(
        jax.random.key(0), model, labels, method="ddim", num_steps=num_steps,
        timestep_spacing=spacing, **kw)

  cases = {
      "unguided (conditional, 1 pass)": run(),
      "classifier-free γ=3 (2B batch)": run(guidance_scale=3.0),
      "classifier s=1 on γ=0": run(guidance_scale=0.0, classifier_scale=1.0),
  }
  print(f"DDIM-{num_steps} sampling, batch {batch}, split over {jax.device_count()} device(s):")
  base = None
  for name, fn in cases.items():
    first, best = _timed(fn, repeats)
    base = base or best
    print(f"  {name:32s} compile+run {first:5.1f} s | {batch / best:7.0f} images/s | "
          f"{best / num_steps * 1e3:6.1f} ms/step | {best / base:4.2f}x unguided")


def main(argv):
  del argv
  startup.tune_allocator()  # as the entry points do
  config = _CONFIG.value
  quick = _QUICK.value
  print(machine.describe())
  graphdef, params = bench_training(config, 5 if quick else _TRAIN_STEPS.value)
  bench_sampling(config, graphdef, params, 32 if quick else _SAMPLE_BATCH.value,
                 5 if quick else _SAMPLE_STEPS.value, 1 if quick else _REPEATS.value,
                 spacing="trailing" if quick else None)  # 5 "leading" steps start far from noise
  print(machine.load())


if __name__ == "__main__":
  xla_flags.configure()  # before JAX starts its backend, as the entry points do
  app.run(main)
