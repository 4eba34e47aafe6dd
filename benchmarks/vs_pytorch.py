"""Speed of cfg_jax against a layer-for-layer PyTorch twin (`torch_twin.py`), in one process.

  pip install -e '.[bench]'                # torch (the CPU build is enough)
  python benchmarks/vs_pytorch.py --quick  # ~2 minutes on a quiet 2-core machine
  python benchmarks/vs_pytorch.py          # DDIM-50, 30 training steps per block, 3 rounds
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/vs_pytorch.py  # A/B

Measures, for both sides: training images/s (batch 64) and CFG DDIM sampling images/s
(batch 256 and 16), with the JAX/PyTorch ratio of each. Then JAX alone: the cost of a
sampler step with classifier-free guidance and with classifier guidance (s = 1 on γ = 0),
each as a ratio to an unguided step, against its bound (one unguided pass plus the
classifier's forward and backward). JAX runs the paths train.py and sample.py take: the
batch split over every device, on a multi-core CPU the two host devices that
`cfg_jax.app.xla_flags.configure()` sets up.

On a shared, noisy machine every measurement is a timed block, and JAX and PyTorch blocks
alternate (ABBA) over several rounds; ratios use the best block of each side and the
spread (median/best) is printed. Untrained weights: speed does not depend on them (both
sides get the same random weights).
"""

import os
import sys
import time

from cfg_jax import data, distributed, models, pipeline, schedules, sharded_sampling
from cfg_jax.app import startup, xla_flags
from cfg_jax.sampling import guided
from cfg_jax.train import classifier, denoiser, loop

try:
  import torch
except ImportError:
  print("vs_pytorch.py needs PyTorch: pip install -e '.[bench]' (or pip install torch).",
        file=sys.stderr)
  sys.exit(1)

import jax
import numpy as np
from absl import app, flags
from jax.tree_util import Partial
from ml_collections import config_flags

import machine
import torch_twin

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"))
_QUICK = flags.DEFINE_bool("quick", False, "Fewer steps and rounds: under ~2 minutes.")
_TRAIN_BATCH = flags.DEFINE_integer("train_batch", 64, "Training batch size.")
_TRAIN_STEPS = flags.DEFINE_integer("train_steps", 30, "Training steps per timed block.")
_SAMPLE_BATCHES = flags.DEFINE_list("sample_batches", ["256", "16"], "Sampling batch sizes.")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 50, "DDIM steps per sample call.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", 3.0, "Classifier-free γ of the sampling test.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Interleaved rounds (each times JAX and torch).")
_RATIO_BATCH = flags.DEFINE_integer("ratio_batch", 256, "Batch of the JAX-internal ratios.")
_SKIP = flags.DEFINE_list("skip", [], "Parts to skip: train, sample, ratios.")
_TORCH_COMPILE = flags.DEFINE_bool("torch_compile", False, "torch.compile the twin.")


def _timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def _interleaved(name, jax_fn, torch_fn, images, rounds):
  """Times both sides in ABBA order; returns (jax img/s, torch img/s) of the best blocks."""
  jax_fn(), torch_fn()  # warm-up: compiles, allocator, oneDNN primitive caches
  times = {"jax": [], "torch": []}
  for r in range(rounds):
    order = (("jax", jax_fn), ("torch", torch_fn))
    for side, fn in (order if r % 2 == 0 else order[::-1]):
      times[side].append(_timed(fn))
  best = {k: min(v) for k, v in times.items()}
  spread = {k: float(np.median(v)) / best[k] for k, v in times.items()}
  j, t = images / best["jax"], images / best["torch"]
  print(f"{name:34s} JAX {j:8.0f} img/s | torch {t:8.0f} img/s | JAX/torch {j / t:5.2f}x "
        f"| median/best JAX {spread['jax']:.2f} torch {spread['torch']:.2f}", flush=True)
  return j, t


def bench_training(config, jax_params, twin, rounds, steps):
  """One timed block = `steps` training steps, metrics read once at the end (as at a log
  step); the JAX step is the project's own jitted, donating data-parallel step."""
  b = _TRAIN_BATCH.value
  spec = data.spec(config.data.name)
  mesh = distributed.data_mesh()
  graphdef, _ = denoiser.create_denoiser(config, 0)
  tx = loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps)
  state = distributed.replicate_tree(loop.init_state(jax_params, tx, with_ema=True), mesh)
  step = loop.one_step_in_flight(loop.jit_data_parallel(
      denoiser.make_train_step(graphdef, tx, schedules.from_config(config.diffusion), config),
      mesh), mesh)  # as loop.fit runs it
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (b, *spec.image_shape)).astype(np.float32)
  labels = rng.integers(0, spec.num_classes, b).astype(np.int32)
  batch = loop.shard_batch({"image": images, "label": labels}, mesh)
  key = jax.random.key(0)
  holder = {"state": state}

  def jax_block():
    s = holder["state"]
    for _ in range(steps):
      s, metrics = step(s, batch, key)
    jax.block_until_ready(metrics)
    holder["state"] = s

  c = config.optimizer
  trainer_t = torch_twin.Trainer(
      twin, torch_twin.cosine_alphas_cumprod(config.diffusion.num_timesteps),
      num_classes=spec.num_classes, p_uncond=config.diffusion.p_uncond,
      learning_rate=c.learning_rate, warmup_steps=c.warmup_steps, weight_decay=c.weight_decay,
      grad_clip_norm=c.grad_clip_norm, b1=c.b1, b2=c.b2, ema_decay=config.train.ema_decay)
  x_t = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  y_t = torch.from_numpy(labels).long()

  def torch_block():
    for _ in range(steps):
      loss = trainer_t.step(x_t, y_t)
    loss.item()

  return _interleaved(f"train b={b} ({steps} steps/block)", jax_block, torch_block,
                      steps * b, rounds)


def bench_sampling(config, eps_fn, twin_eval, batch, rounds, num_steps):
  """The project's sampling path as sample.py runs it: the batch split over every device."""
  spec = data.spec(config.data.name)
  model = pipeline.Pipeline.from_config(config, eps_fn)
  abar = torch_twin.cosine_alphas_cumprod(config.diffusion.num_timesteps)
  labels = np.arange(batch) % spec.num_classes
  labels_t = torch.from_numpy(labels).long()
  gen = torch.Generator().manual_seed(0)
  h, w, c = spec.image_shape

  def jax_block():
    sharded_sampling.sample_sharded(jax.random.key(0), model, labels, method="ddim",
                                    num_steps=num_steps, guidance_scale=_GUIDANCE.value)

  def torch_block():
    torch_twin.ddim_cfg_sample(twin_eval, abar, labels_t, num_steps=num_steps,
                               guidance_scale=_GUIDANCE.value, null_label=spec.num_classes,
                               image_shape=(c, h, w), generator=gen)

  return _interleaved(f"CFG DDIM-{num_steps} sample b={batch}", jax_block, torch_block, batch,
                      rounds)


def bench_guidance_ratios(config, eps_fn, batch, rounds, num_steps):
  """JAX-internal: seconds per sampler step of CFG and classifier guidance vs unguided, on
  the path sample.py takes (the batch split over every device)."""
  spec = data.spec(config.data.name)
  cls_graphdef, cls_params = classifier.create_classifier(config, 0)
  classifier_fn = Partial(models.apply, cls_graphdef, cls_params)
  model = pipeline.Pipeline.from_config(config, eps_fn, classifier_fn)
  labels = np.arange(batch) % spec.num_classes

  def run(**kw):
    return lambda: sharded_sampling.sample_sharded(jax.random.key(0), model, labels,
                                                   method="ddim", num_steps=num_steps, **kw)

  # What classifier guidance adds: the classifier's forward + backward, split the same way.
  mesh = distributed.data_mesh()
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jax.device_put(np.random.default_rng(1).standard_normal(
      (batch, *spec.image_shape)).astype(np.float32), batch_sharding)
  t = jax.device_put(np.full((batch,), 500, np.int32), batch_sharding)
  y = jax.device_put(labels.astype(np.int32), batch_sharding)
  replicated_fn = sharded_sampling.replicate_model(model, mesh).classifier_fn
  grad_fn = jax.jit(lambda fn, x: guided.classifier_gradient(fn, x, t, y, 1.0))

  def classifier_only():
    for _ in range(num_steps):
      g = grad_fn(replicated_fn, x)
    jax.block_until_ready(g)

  cases = {
      "unguided (γ=1, one pass)": run(),
      "CFG γ=3 (batched 2B pass)": run(guidance_scale=3.0),
      "classifier s=1 on γ=0": run(guidance_scale=0.0, classifier_scale=1.0),
      "classifier fwd+bwd alone": classifier_only,
  }
  for fn in cases.values():
    fn()  # compile
  best = {name: float("inf") for name in cases}
  for _ in range(rounds):
    for name, fn in cases.items():
      best[name] = min(best[name], _timed(fn))
  ms = {name: s / num_steps * 1e3 for name, s in best.items()}
  base = ms["unguided (γ=1, one pass)"]
  print(f"JAX sampler step costs at b={batch} (best of {rounds}):")
  for name, v in ms.items():
    print(f"  {name:30s} {v:7.1f} ms/step  {v / base:5.2f}x unguided")
  bound = (base + ms["classifier fwd+bwd alone"]) / base
  print(f"  bound: CFG 2.00x (twice the images per pass); classifier-guided {bound:.2f}x "
        "(unguided + classifier fwd+bwd)")
  return ms


def main(argv):
  del argv
  startup.tune_allocator()  # as the entry points do
  torch.set_num_threads(os.cpu_count())
  # XLA:CPU runs with denormals flushed to zero; give the twin the same arithmetic.
  torch.set_flush_denormal(True)
  quick = _QUICK.value
  rounds = 2 if quick else _ROUNDS.value
  train_steps = 10 if quick else _TRAIN_STEPS.value
  sample_steps = 10 if quick else _SAMPLE_STEPS.value
  config = _CONFIG.value
  config.diffusion.min_snr_gamma = None  # the twin's loss is the plain ε-MSE
  print(machine.describe())
  print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")

  graphdef, params = denoiser.create_denoiser(config, 0)
  # Random (not zero) output layers, so no side can shortcut a zero branch.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda p: np.asarray(p) + 0.02 * rng.standard_normal(p.shape).astype(np.float32), params)
  twin = torch_twin.UNet(models.model_config(config).to_dict())
  torch_twin.load_jax_params(twin, params)
  n_jax, n_torch = models.count_params(params), torch_twin.count_params(twin)
  print(f"parameters: JAX {n_jax:,} | torch twin {n_torch:,}")
  if n_jax != n_torch:
    raise SystemExit("The twin's parameter count differs from the JAX UNet's.")
  twin_eval = torch.compile(twin) if _TORCH_COMPILE.value else twin

  skip = set(_SKIP.value)
  results = {}
  eps_fn = Partial(models.apply, graphdef, jax.device_put(params))
  if "sample" not in skip:
    for b in (int(v) for v in _SAMPLE_BATCHES.value):
      results[f"sample{b}"] = bench_sampling(config, eps_fn, twin_eval, b, rounds, sample_steps)
  if "ratios" not in skip:
    bench_guidance_ratios(config, eps_fn, _RATIO_BATCH.value, rounds, sample_steps)
  if "train" not in skip:
    # Training mutates the weights, so it runs last.
    results["train"] = bench_training(config, params, twin_eval, rounds, train_steps)
  print("JAX/torch: " + " | ".join(f"{k} {j / t:.2f}x" for k, (j, t) in results.items()))
  print(machine.load())


if __name__ == "__main__":
  xla_flags.configure()  # before JAX starts its backend, as the entry points do
  app.run(main)
