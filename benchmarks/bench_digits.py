"""Throughput and compile times for a config on whatever device JAX sees.

  python benchmarks/bench_digits.py                       # configs/digits.py
  python benchmarks/bench_digits.py --config.model.base_channels=64

Reports training images/s, sampling images/s (γ = 3, DDIM 50 steps, batch 256), the cost
of a classifier-free-guided step and of a classifier-guided step relative to an unguided
one, and compile times. Untrained weights: speed does not depend on them.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from absl import app, flags
from jax.tree_util import Partial
from ml_collections import config_flags

from cfg_jax import cli, data, models, sampling, schedules, xla_flags
from cfg_jax.train import classifier as classifier_training
from cfg_jax.train import diffusion as diffusion_training
from cfg_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"))
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 50, "Timed training steps.")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 256, "Sampling batch size.")
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


def bench_training(config):
  mesh = loop.data_mesh()
  spec = data.spec(config.data.name)
  graphdef, params = diffusion_training.create_unet(config, 0)
  tx = loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps)
  state = loop.replicate(loop.init_state(params, tx, with_ema=True), mesh)
  step = loop.jit_data_parallel(
      diffusion_training.make_train_step(graphdef, tx, schedules.from_config(config.diffusion), config), mesh)
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
  for _ in range(_TRAIN_STEPS.value):
    state, metrics = step(state, batch, jax.random.key(0))
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  print(f"UNet parameters:               {models.count_params(params):,}")
  print(f"train step compile (s):        {compile_s:.1f}")
  print(f"train images/s (batch {b}):    {_TRAIN_STEPS.value * b / seconds:.0f}")
  return graphdef, state.ema_params


def bench_sampling(config, graphdef, params):
  spec = data.spec(config.data.name)
  schedule = schedules.from_config(config.diffusion)
  eps_fn = Partial(models.apply, graphdef, params)
  cls_graphdef, cls_params = classifier_training.create_classifier(config, 0)
  classifier_fn = Partial(models.apply, cls_graphdef, cls_params)
  n = _SAMPLE_BATCH.value
  labels = np.arange(n) % spec.num_classes

  def run(**kw):
    return lambda: sampling.sample(jax.random.key(0), eps_fn, schedule, labels,
                                   image_shape=spec.image_shape, num_steps=50, **kw)

  cases = {
      "unguided (conditional, 1 pass)": run(),
      "classifier-free γ=3 (2B batch)": run(guidance_scale=3.0, null_label=spec.num_classes),
      "classifier s=1 on γ=0": run(guidance_scale=0.0, null_label=spec.num_classes,
                                   classifier_fn=classifier_fn, classifier_scale=1.0),
  }
  base = None
  for name, fn in cases.items():
    first, best = _timed(fn, _REPEATS.value)
    base = base or best
    print(f"{name:32s} compile+run {first:5.1f} s | {n / best:7.0f} images/s | "
          f"{best / 50 * 1e3:6.1f} ms/step | {best / base:4.2f}× unguided")


def main(argv):
  del argv
  xla_flags.configure()  # before JAX starts its backend, as the entry points do
  cli.tune_allocator()
  config = _CONFIG.value
  print(f"JAX {jax.__version__} on {jax.device_count()}× {jax.devices()[0].device_kind}")
  graphdef, params = bench_training(config)
  bench_sampling(config, graphdef, params)


if __name__ == "__main__":
  app.run(main)
