"""A/B measurements of the performance levers of issue 10, JAX only, on the default UNet.

  python benchmarks/levers.py --parts=hlo,sampler,train,parts
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/levers.py --parts=train

Each part prints milliseconds per step (best of --rounds timed blocks) for variants that
compute the same thing, so the variants can be compared within one process:

* hlo: bare `convolution(` (outside any fusion) in the compiled train step and sampler.
* sampler: a DDIM loop like cfg_jax.sampling's, with the classifier gradient behind
  `lax.cond` or not, only the pass γ needs (γ = 0: unconditional only), and scan unrolling.
* train: K training steps per dispatch (a Python loop inside one jit, or `lax.scan`).
* parts: where a training step goes: forward, forward + backward, the optimizer + EMA.
* conv: the UNet and classifier built from nnx.Conv against cfg_jax.models.conv.Conv.
* devices: one UNet forward per batch size, on one device and split over every device.

Findings are in benchmarks/PERF_FINDINGS.md.
"""

import contextlib
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Every cfg_jax import of this benchmark, in one block (the package layout may move).
from cfg_jax import cli, models, sampling, schedules, xla_flags
from cfg_jax.models import conv, unet
from cfg_jax.train import classifier as classifier_training
from cfg_jax.train import diffusion as diffusion_training
from cfg_jax.train import loop

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from jax.tree_util import Partial
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "..", "configs", "digits.py"))
_PARTS = flags.DEFINE_list("parts", ["hlo", "sampler", "train", "parts"], "What to measure.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed blocks per variant (best is reported).")
_BATCH = flags.DEFINE_integer("sample_batch", 256, "Sampler batch.")
_STEPS = flags.DEFINE_integer("sample_steps", 10, "Sampler steps per timed call.")
_UNROLLS = flags.DEFINE_list("unrolls", ["1", "2", "5"], "Sampler scan unroll factors.")
_KS = flags.DEFINE_list("ks", ["1", "2", "4", "8"], "Training steps per dispatch.")
_VARIANTS = flags.DEFINE_list("flag_variants", [], "Subset of FLAG_VARIANTS (default: all).")


def _best_ms(fn, per, rounds):
  jax.block_until_ready(fn())  # compile
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best / per * 1e3


def _fresh_state(params, tx):
  # Train steps donate the state: give each its own copy of the shared parameters.
  return loop.init_state(jax.tree_util.tree_map(jnp.copy, params), tx, with_ema=True)


def _setup(config):
  graphdef, params = diffusion_training.create_unet(config, 0)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.asarray(p) + 0.02 * rng.standard_normal(p.shape), jnp.float32),
      params)
  return graphdef, params


def classifier_free_eps(eps_fn, x_t, t, y, guidance_scale, null_label):
  """ε̂ = ε(x,t,∅) + γ·(ε(x,t,y) − ε(x,t,∅)), both passes in one batched 2B call: plain CFG
  without `guidance.CFG`'s options (the library's one rule), so timings compare across runs."""
  both = eps_fn(jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                jnp.concatenate([y, jnp.full_like(y, null_label)]))
  eps_cond, eps_uncond = jnp.split(both, 2)
  return eps_uncond + guidance_scale * (eps_cond - eps_uncond)  # Ho & Salimans eq. (6)


def ddim_loop(eps_fn, classifier_fn, schedule, labels, x, *, num_steps, guidance_scale,
              null_label, passes, classifier_scale, use_cond, unroll):
  """cfg_jax.sampling's DDIM (η = 0, clipped x0) with the levers as options.

  passes: "both" (one batched cond + uncond call), "uncond" or "cond" (one pass of B).
  """
  ts = jnp.asarray(sampling.timesteps(schedule.num_timesteps, num_steps))
  stride = schedule.num_timesteps // num_steps
  batch = labels.shape[0]

  def step(x_t, t):
    t_b = jnp.full((batch,), t, jnp.int32)
    if passes == "both":
      eps = classifier_free_eps(eps_fn, x_t, t_b, labels, guidance_scale, null_label)
    else:
      y = labels if passes == "cond" else jnp.full_like(labels, null_label)
      eps = eps_fn(x_t, t_b, y)
    grad = None
    if classifier_fn is not None:
      gradient = _classifier_gradient_in_cond if use_cond else sampling.classifier_gradient
      grad = gradient(classifier_fn, x_t, t_b, labels, classifier_scale)
    x_prev = sampling.ddim_step(schedule, x_t, t_b, t_b - stride, eps, grad, 0.0,
                                jnp.zeros_like(x_t), True)
    return x_prev, None

  return jax.lax.scan(step, x, ts, unroll=unroll)[0]


def _classifier_gradient_in_cond(classifier_fn, x_t, t, y, scale):
  """The gradient inside `lax.cond(s != 0, ...)`, as the sampler had it before."""
  return jax.lax.cond(scale != 0,
                      lambda x: sampling.classifier_gradient(classifier_fn, x, t, y, scale),
                      jnp.zeros_like, x_t)


def compiled_sampler_text(*args, **kwargs) -> str:
  """The optimised HLO of the program that `sampling.sample(*args, **kwargs)` runs."""
  real, captured = sampling._sample_jit, {}

  def spy(*a, **k):
    captured["text"] = real.lower(*a, **k).compile().as_text()
    return real(*a, **k)

  sampling._sample_jit = spy
  try:
    sampling.sample(*args, **kwargs)
  finally:
    sampling._sample_jit = real
  return captured["text"]


def part_hlo(config, graphdef, params):
  schedule = schedules.from_config(config.diffusion)
  tx = loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps)
  state = _fresh_state(params, tx)
  step = jax.jit(diffusion_training.make_train_step(graphdef, tx, schedule, config),
                 donate_argnums=0)
  batch = {"image": jnp.zeros((64, 8, 8, 1)), "label": jnp.zeros((64,), jnp.int32)}
  text = step.lower(state, batch, jax.random.key(0)).compile().as_text()
  print(f"hlo: train step: {conv.unfused_convolutions(text)} bare convolution(s)")
  for line in text.splitlines():
    if "convolution(" in line and "lhs_dilate" in line and "fusion" not in line.split("=")[0]:
      print("   e.g.", line.strip()[:140])
      break
  eps_fn = Partial(models.apply, graphdef, params)
  cls_graphdef, cls_params = classifier_training.create_classifier(config, 0)
  cls_fn = Partial(models.apply, cls_graphdef, cls_params)
  labels = jnp.arange(_BATCH.value) % 10
  for name, kw in (("CFG γ=3", dict(guidance_scale=3.0)),
                   ("classifier on γ=0", dict(guidance_scale=0.0, classifier_fn=cls_fn,
                                              classifier_scale=1.0))):
    text = compiled_sampler_text(jax.random.key(0), eps_fn, schedule, labels,
                                 image_shape=(8, 8, 1), num_steps=50, null_label=10, **kw)
    print(f"hlo: sampler {name}: {conv.unfused_convolutions(text)} bare convolution(s)")


def part_sampler(config, graphdef, params):
  schedule = schedules.from_config(config.diffusion)
  eps_fn = Partial(models.apply, graphdef, params)
  cls_graphdef, cls_params = classifier_training.create_classifier(config, 0)
  cls_fn = Partial(models.apply, cls_graphdef, cls_params)
  b, n = _BATCH.value, _STEPS.value
  labels = jnp.arange(b) % 10
  x = jax.random.normal(jax.random.key(0), (b, 8, 8, 1))

  def variant(**kw):
    fn = jax.jit(lambda x, g, s: ddim_loop(
        kw.get("eps_fn", eps_fn), kw.get("classifier_fn"), schedule, labels, x, num_steps=n,
        guidance_scale=g, null_label=10, passes=kw.get("passes", "both"),
        classifier_scale=s, use_cond=kw.get("use_cond", True), unroll=kw.get("unroll", 1)))
    compiled = fn.lower(x, 3.0, 1.0).compile()
    ms = _best_ms(lambda: compiled(x, 3.0, 1.0), n, _ROUNDS.value)
    return ms, conv.unfused_convolutions(compiled.as_text())

  rows = {}
  for u in (int(v) for v in _UNROLLS.value):
    rows[f"CFG both passes, unroll={u}"] = variant(unroll=u)
  rows["one pass (unguided / γ=1)"] = variant(passes="cond")
  rows["γ=0 classifier: both passes + lax.cond"] = variant(classifier_fn=cls_fn)
  rows["γ=0 classifier: both passes, no cond"] = variant(classifier_fn=cls_fn, use_cond=False)
  rows["γ=0 classifier: uncond pass + lax.cond"] = variant(classifier_fn=cls_fn,
                                                          passes="uncond")
  rows["γ=0 classifier: uncond pass, no cond"] = variant(classifier_fn=cls_fn, passes="uncond",
                                                        use_cond=False)
  base = rows["one pass (unguided / γ=1)"][0]
  print(f"sampler, b={b}, {n} steps per call (ms per step, best of {_ROUNDS.value}):")
  for name, (ms, bare) in rows.items():
    print(f"  {name:48s} {ms:7.1f} ms  {ms / base:5.2f}x one pass  bare convs {bare}")


def part_train(config, graphdef, params):
  schedule = schedules.from_config(config.diffusion)
  tx = loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps)
  step = diffusion_training.make_train_step(graphdef, tx, schedule, config)
  b = config.train.batch_size
  total = 48  # steps per timed block, a multiple of every K
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (total, b, 8, 8, 1)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, (total, b)), jnp.int32)
  key = jax.random.key(0)

  def make(k, mode):
    def multi(state, batches, rng):
      if mode == "loop":
        for i in range(k):
          state, metrics = step(state, jax.tree_util.tree_map(lambda v: v[i], batches), rng)
        return state, metrics
      state, metrics = jax.lax.scan(lambda s, bt: step(s, bt, rng), state, batches,
                                    unroll=k if mode == "scan_unrolled" else 1)
      return state, jax.tree_util.tree_map(lambda m: m[-1], metrics)

    return jax.jit(multi, donate_argnums=0)

  results = []
  for mode in ("loop", "scan", "scan_unrolled"):
    for k in (int(v) for v in _KS.value):
      if mode != "loop" and k == 1:
        continue
      fn = make(k, mode)
      holder = {"s": _fresh_state(params, tx)}
      chunks = [{"image": images[i:i + k], "label": labels[i:i + k]} for i in range(0, total, k)]

      def block():
        s = holder["s"]
        for c in chunks:
          s, m = fn(s, c, key)
        holder["s"] = s
        return m

      ms = _best_ms(block, total, _ROUNDS.value)
      bare = conv.unfused_convolutions(fn.lower(holder["s"], chunks[0], key).compile().as_text())
      results.append((f"{mode} K={k}", ms, bare))
  base = results[0][1]
  print(f"train, b={b} (ms per step, best of {_ROUNDS.value} blocks of {total} steps):")
  for name, ms, bare in results:
    print(f"  {name:20s} {ms:7.2f} ms  {b / ms * 1e3:6.0f} img/s  {base / ms:5.2f}x  "
          f"bare convs {bare}")


def part_parts(config, graphdef, params):
  """Forward, forward+backward and update alone, at the training batch."""
  schedule = schedules.from_config(config.diffusion)
  tx = loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps)
  b = config.train.batch_size
  x = jax.random.normal(jax.random.key(0), (b, 8, 8, 1))
  t = jnp.arange(b, dtype=jnp.int32) * 15
  y = jnp.arange(b, dtype=jnp.int32) % 11
  drop = jax.random.key(1)

  def loss(p):
    from flax import nnx
    return jnp.mean(jnp.square(nnx.merge(graphdef, p)(x, t, y, dropout_key=drop) - x))

  fwd = jax.jit(loss)
  fwd_bwd = jax.jit(jax.grad(loss))
  grads = fwd_bwd(params)
  state = _fresh_state(params, tx)

  def update(state, grads):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    p = optax.apply_updates(state.params, updates)
    ema = loop.ema_update(state.ema_params, p, state.step, config.train.ema_decay)
    return loop.TrainState(state.step + 1, p, ema, opt_state), optax.tree.norm(grads)

  upd = jax.jit(update, donate_argnums=0)
  holder = {"s": state}

  def run_update():
    for _ in range(20):
      holder["s"], n = upd(holder["s"], grads)
    return n

  r = _ROUNDS.value
  full = jax.jit(diffusion_training.make_train_step(graphdef, tx, schedule, config),
                 donate_argnums=0)
  holder2 = {"s": _fresh_state(params, tx)}
  batch = {"image": x, "label": y}

  def run_full():
    for _ in range(20):
      holder2["s"], m = full(holder2["s"], batch, drop)
    return m

  def loop(fn, arg):
    def run():
      for _ in range(20):
        out = fn(arg)
      return out
    return run

  print(f"parts of a training step, b={b} (ms, best of {r} blocks of 20):")
  print(f"  forward (loss)          {_best_ms(loop(fwd, params), 20, r):7.2f}")
  print(f"  forward + backward      {_best_ms(loop(fwd_bwd, params), 20, r):7.2f}")
  print(f"  AdamW + clip + EMA      {_best_ms(run_update, 20, r):7.2f}")
  print(f"  full train step         {_best_ms(run_full, 20, r):7.2f}")


def _train_inputs(config):
  """(schedule, optimizer, batch size, a fixed batch, a key): what every training A/B uses."""
  b = config.train.batch_size
  batch = {"image": jax.random.normal(jax.random.key(0), (b, 8, 8, 1)),
           "label": jnp.arange(b, dtype=jnp.int32) % 10}
  tx = loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps)
  return schedules.from_config(config.diffusion), tx, b, batch, jax.random.key(1)


def _cfg_samplers(eps_fn, schedule, key, suffix=""):
  """{"CFG sampler b=N" + suffix: (fn, steps per call)}: γ = 3 DDIM loops at batch 256 and
  16, each compiled (and so traced with the current unet.group_norm) before it returns."""
  fns = {}
  for sb in (256, 16):
    labels = jnp.arange(sb) % 10
    x = jax.random.normal(key, (sb, 8, 8, 1))
    sample = jax.jit(lambda x, g, labels=labels: ddim_loop(
        eps_fn, None, schedule, labels, x, num_steps=_STEPS.value, guidance_scale=g,
        null_label=10, passes="both", classifier_scale=0.0, use_cond=True, unroll=1))
    fn = (lambda sample=sample, x=x: sample(x, 3.0))
    jax.block_until_ready(fn())
    fns[f"CFG sampler b={sb}{suffix}"] = (fn, _STEPS.value)
  return fns


def _best_ms_per_step(fns):
  """{name: best ms per step} over --rounds interleaved rounds of {name: (fn, steps)}."""
  best = {k: float("inf") for k in fns}
  for _ in range(_ROUNDS.value):
    for k, (fn, per) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      best[k] = min(best[k], (time.perf_counter() - start) / per * 1e3)
  return best


def _reference_group_norm(norm, x, scale=None, shift=None):
  """nnx.GroupNorm then the scale-shift, as the UNet computed them before."""
  h = norm(x)
  return h if scale is None else h * (1 + scale[:, None, None]) + shift[:, None, None]


def part_gn(config, graphdef, params):
  """unet.group_norm against nnx.GroupNorm: train step and CFG sampler step, interleaved."""
  schedule, tx, b, batch, key = _train_inputs(config)
  fast = unet.group_norm
  fns = {}
  for name, gn in (("nnx.GroupNorm", _reference_group_norm), ("unet.group_norm", fast)):
    unet.group_norm = gn  # read at trace time, so each jit below keeps its variant
    step = jax.jit(diffusion_training.make_train_step(graphdef, tx, schedule, config),
                   donate_argnums=0)
    holder = {"s": _fresh_state(params, tx)}

    def train(step=step, holder=holder):
      for _ in range(20):
        holder["s"], m = step(holder["s"], batch, key)
      return m

    jax.block_until_ready(train())
    fns[f"train b={b}, {name}"] = (train, 20)
    fns.update(_cfg_samplers(Partial(models.apply, graphdef, params), schedule, key,
                             suffix=f", {name}"))
  unet.group_norm = fast
  best = _best_ms_per_step(fns)
  print(f"GroupNorm A/B (ms per step, best of {_ROUNDS.value}, interleaved):")
  for k in sorted(best):
    print(f"  {k:40s} {best[k]:7.2f}")


def part_steps(config, graphdef, params):
  """The three headline costs, for A/B runs of XLA_FLAGS (one setting per process)."""
  schedule, tx, b, batch, key = _train_inputs(config)
  step = jax.jit(diffusion_training.make_train_step(graphdef, tx, schedule, config),
                 donate_argnums=0)
  holder = {"s": _fresh_state(params, tx)}

  def train():
    for _ in range(20):
      holder["s"], m = step(holder["s"], batch, key)
    return m

  jax.block_until_ready(train())
  fns = {f"train b={b}": (train, 20)}
  fns.update(_cfg_samplers(Partial(models.apply, graphdef, params), schedule, key))
  best = _best_ms_per_step(fns)
  print("steps: " + " | ".join(f"{k} {v:.2f} ms" for k, v in best.items()))


def part_flops(config, graphdef, params):
  """FLOPs of one train step and one CFG sampler step, by XLA's cost analysis."""
  schedule = schedules.from_config(config.diffusion)
  tx = loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps)
  b = config.train.batch_size
  batch = {"image": jnp.zeros((b, 8, 8, 1)), "label": jnp.zeros((b,), jnp.int32)}
  step = jax.jit(diffusion_training.make_train_step(graphdef, tx, schedule, config))
  flops = step.lower(_fresh_state(params, tx), batch, jax.random.key(0)).cost_analysis()["flops"]
  print(f"flops: train step b={b}: {flops / 1e9:.2f} GFLOP")
  eps_fn = Partial(models.apply, graphdef, params)
  for sb in (256, 16):
    labels = jnp.arange(sb) % 10
    x = jnp.zeros((sb, 8, 8, 1))
    one = jax.jit(lambda x: classifier_free_eps(
        eps_fn, x, jnp.full((sb,), 500, jnp.int32), labels, 3.0, 10))
    print(f"flops: CFG sampler step b={sb} (2B pass): "
          f"{one.lower(x).cost_analysis()['flops'] / 1e9:.2f} GFLOP")


FLAG_VARIANTS = {
    "XLA default (YNN on)": {},
    "YNN off": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "YNN convs only": {"xla_cpu_experimental_ynn_fusion_type":
                       "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
    "YNN on, vector width 512": {"xla_cpu_prefer_vector_width": 512},
    "YNN off, vector width 512": {"xla_cpu_experimental_ynn_fusion_type": "",
                                  "xla_cpu_prefer_vector_width": 512},
}


def part_flags(config, graphdef, params):
  """XLA:CPU options A/B in one process: each variant is its own executable
  (`compile(compiler_options=...)`), and the timed blocks of all variants interleave.
  Run with CFG_JAX_XLA_FLAGS=0 so the baseline is XLA's own default."""
  schedule, tx, b, batch, key = _train_inputs(config)
  step = jax.jit(diffusion_training.make_train_step(graphdef, tx, schedule, config),
                 donate_argnums=0)
  lowered_train = step.lower(_fresh_state(params, tx), batch, key)
  eps_fn = Partial(models.apply, graphdef, params)
  lowered_samplers = {}
  for sb in (256, 16):
    labels = jnp.arange(sb) % 10
    x = jax.random.normal(key, (sb, 8, 8, 1))
    sample = jax.jit(lambda x, eps_fn, labels=labels: ddim_loop(
        eps_fn, None, schedule, labels, x, num_steps=_STEPS.value, guidance_scale=3.0,
        null_label=10, passes="both", classifier_scale=0.0, use_cond=True, unroll=1))
    lowered_samplers[sb] = (sample.lower(x, eps_fn), x)
  fns = {}
  variants = {k: v for k, v in FLAG_VARIANTS.items()
              if not _VARIANTS.value or k in _VARIANTS.value or k == "XLA default (YNN on)"}
  for name, options in variants.items():
    train_exe = lowered_train.compile(compiler_options=options)
    holder = {"s": _fresh_state(params, tx)}

    def train(exe=train_exe, holder=holder):
      for _ in range(20):
        holder["s"], m = exe(holder["s"], batch, key)
      return m

    fns[(f"train b={b}", name)] = (train, 20)
    for sb, (lowered, x) in lowered_samplers.items():
      exe = lowered.compile(compiler_options=options)
      fns[(f"CFG sampler b={sb}", name)] = (lambda exe=exe, x=x: exe(x, eps_fn), _STEPS.value)
  for fn, _ in fns.values():
    jax.block_until_ready(fn())
  times = {k: [] for k in fns}
  for _ in range(_ROUNDS.value):
    for k, (fn, per) in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append((time.perf_counter() - start) / per * 1e3)
  print(f"XLA:CPU options (ms per step: best / median of {_ROUNDS.value}, interleaved):")
  for what in dict.fromkeys(k[0] for k in fns):
    base = min(times[(what, "XLA default (YNN on)")])
    for name in variants:
      v = times[(what, name)]
      print(f"  {what:18s} {name:28s} {min(v):8.2f} / {np.median(v):8.2f}  "
            f"{base / min(v):5.2f}x speed-up")


def part_conv(config, graphdef, params):
  """nnx.Conv against conv.Conv (input gradient as a forward convolution), same weights:
  unguided, CFG and classifier-guided steps of cfg_jax.sampling, interleaved."""
  del graphdef
  schedule = schedules.from_config(config.diffusion)
  cls_params = _setup_classifier(config)
  labels = np.arange(_BATCH.value) % 10
  fns = {}
  for name, conv_layer in (("nnx.Conv", nnx.Conv), ("conv.Conv", conv.Conv)):
    with _conv_layer(conv_layer):
      unet_graphdef, _ = diffusion_training.create_unet(config, 0)
      cls_graphdef, _ = classifier_training.create_classifier(config, 0)
    eps_fn = Partial(models.apply, unet_graphdef, params)
    cls_fn = Partial(models.apply, cls_graphdef, cls_params)
    for case, kw in (("unguided", {}), ("CFG γ=3", dict(guidance_scale=3.0, null_label=10)),
                     ("classifier s=1 on γ=0", dict(guidance_scale=0.0, null_label=10,
                                                    classifier_fn=cls_fn,
                                                    classifier_scale=1.0))):
      fn = functools.partial(sampling.sample, jax.random.key(0), eps_fn, schedule, labels,
                             image_shape=(8, 8, 1), num_steps=_STEPS.value, **kw)
      jax.block_until_ready(fn())
      fns[f"{case}, {name}"] = (fn, _STEPS.value)
  for k, v in _best_ms_per_step(fns).items():
    print(f"conv: {k:36s} {v:8.1f} ms/step")


def part_devices(config, graphdef, params):
  """One UNet forward at several batch sizes: on one device, and split over every device."""
  del config
  mesh = loop.data_mesh()
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  forward = jax.jit(functools.partial(models.apply, graphdef))
  placed = {"1 device": (jax.device_put(params, jax.devices()[0]), None),
            f"{mesh.size} devices": (loop.replicate(params, mesh), split)}
  for batch in (16, 32, 64, 128, 256, 512):
    inputs = (np.zeros((batch, 8, 8, 1), np.float32), np.full((batch,), 500, np.int32),
              np.zeros((batch,), np.int32))
    fns = {}
    for name, (p, sharding) in placed.items():
      args = [jax.device_put(a, sharding) if sharding else jnp.asarray(a) for a in inputs]
      fns[f"forward b={batch}, {name}"] = (functools.partial(forward, p, *args), 1)
    for k, v in _best_ms_per_step(fns).items():
      print(f"devices: {k:30s} {v:8.2f} ms")


@contextlib.contextmanager
def _conv_layer(layer):
  """Builds the UNet's convolutions from `layer` (the parameters do not change)."""
  saved = conv.Conv
  conv.Conv = layer
  try:
    yield
  finally:
    conv.Conv = saved


def _setup_classifier(config):
  _, cls_params = classifier_training.create_classifier(config, 0)
  rng = np.random.default_rng(1)
  return jax.tree_util.tree_map(
      lambda p: jnp.asarray(np.asarray(p) + 0.02 * rng.standard_normal(p.shape), jnp.float32),
      cls_params)


def main(argv):
  del argv
  cli.tune_allocator()
  config = _CONFIG.value
  print(f"JAX {jax.__version__}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
  graphdef, params = _setup(config)
  for part in _PARTS.value:
    globals()[f"part_{part}"](config, graphdef, params)
  print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  xla_flags.configure()
  app.run(main)
