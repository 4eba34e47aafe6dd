"""Config validation up front: every value that cannot work is one clear error before any
data is read or any code is compiled (the main job calls `validate` first)."""

from __future__ import annotations

import math
import numbers

from cfg_jax import data, errors, sampling, schedules
from cfg_jax.train import loop

COMPUTE_DTYPES = ("float32", "bfloat16")


def validate(config) -> None:
  """Raises `ConfigError` naming the first bad field of `config` and how to fix it."""
  _int(config, "seed", low=0)
  spec = data.spec(config.data.name)
  _denoiser(config.model, spec)
  if config.get("latent") is not None:
    _latent(config)
  _distill(config)
  _diffusion(config.diffusion)
  train = config.train
  _int(train, "num_steps", "train", low=0)
  _optimizer(config.optimizer, "optimizer", train.num_steps)
  _int(train, "batch_size", "train", low=1)
  _int(train, "log_every", "train", low=1)
  _int(train, "checkpoint_every", "train", low=1)
  _int(train, "max_checkpoints_to_keep", "train", low=1)
  _steps(train.get("keep_steps", ()), "train.keep_steps")
  _number(train, "ema_decay", "train", low=0, high=1, high_open=True)
  if train.get("dtype", "float32") not in COMPUTE_DTYPES:
    _fail("train.dtype", f"is {train.dtype!r}", f"choose one of {COMPUTE_DTYPES}")
  c = config.classifier
  _int(c, "num_steps", "classifier", low=0)
  _int(c, "batch_size", "classifier", low=1)
  if c.num_steps > 0:
    _model(c.model, "classifier.model", spec)
    _optimizer(c.optimizer, "classifier.optimizer", c.num_steps)
  _sampling(config.sampling, config.diffusion.num_timesteps)
  # Last: ᾱ_T ≈ 0 for the configured schedule and T, and the grids' sampler options.
  _sampler_accepts(config, schedules.from_config(config.diffusion))


def check_devices(config, device_count: int) -> None:
  """Raises `ConfigError` unless every training batch splits evenly over `device_count`
  devices (the global batch is sharded over all of them)."""
  batches = {"train.batch_size": config.train.batch_size}
  if config.classifier.num_steps > 0:
    batches["classifier.batch_size"] = config.classifier.batch_size
  for field, size in batches.items():
    if size % device_count:
      _fail(field, f"({size}) must be divisible by the {device_count} devices",
            f"set --config.{field} to a multiple of {device_count}")


def _fail(field: str, problem: str, fix: str) -> None:
  raise errors.ConfigError(f"config.{field} {problem}; {fix}.")


def _int(section, name, prefix="", low=None):
  field = f"{prefix}.{name}" if prefix else name
  value = section[name]
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    _fail(field, f"must be an integer, got {value!r}", f"set --config.{field}=N")
  if low is not None and value < low:
    _fail(field, f"must be >= {low}, got {value}", f"set --config.{field} to {low} or more")
  return value


def _number(section, name, prefix, low=None, high=None, low_open=False, high_open=False):
  field = f"{prefix}.{name}"
  value = section[name]
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    lo = "" if low is None else f"{'(' if low_open else '['}{low}, "
    hi = "" if high is None else f"{high}{')' if high_open else ']'}"
    _fail(field, f"must be a finite number in {lo or '(-inf, '}{hi or 'inf)'}, got {value!r}",
          f"set --config.{field} within that range")
  return value


def _denoiser(m, spec):
  """The diffusion model's section: the UNet's fields, or a DiT's (`family="dit"`)."""
  name = m.get("family", "unet")
  if name == "unet":
    _model(m, "model", spec)
  elif name == "dit":
    _dit(m, spec)
  else:
    _fail("model.family", f"is {name!r}, which cfg-jax does not train",
          "train family 'unet' or 'dit'; convert released ADM models with convert.py")


def _latent(config):
  """Latent diffusion: a DiT on the frozen VAE of another workdir, the split in memory."""
  if config.model.get("family", "unet") != "dit":
    _fail("latent", "needs a DiT (model.family='dit')", "use configs/dit_latent.py")
  if not config.latent.get("vae_workdir"):
    _fail("latent.vae_workdir", "is empty", "name a workdir with a VAE, e.g. one written by "
          "convert.py dit")
  if config.data.get("streaming", False):
    _fail("data.streaming", "is True, but a latent model encodes its split once, in memory",
          "set --config.data.streaming=False")
  if config.classifier.num_steps > 0:
    _fail("classifier.num_steps", "must be 0 for a latent model (the noisy classifier trains "
          "on pixels)", "set --config.classifier.num_steps=0")


def _distill(config):
  """A guidance-distilled student: a UNet with a w-embedding, and the teacher it learns from
  (read and checked against the student by `train.distill.resolve_teacher`)."""
  section = config.get("distill")
  embedded = config.model.get("guidance_embedding", False)
  if section is None:
    if embedded:
      _fail("model.guidance_embedding", "is True without a distill section (a student learns "
            "from a teacher)", "use configs/digits_distill.py")
    return
  if not embedded or config.model.get("family", "unet") != "unet":
    _fail("model", "must be a UNet with guidance_embedding=True for distillation",
          "use configs/digits_distill.py")
  if not section.get("teacher_workdir"):
    _fail("distill.teacher_workdir", "is empty", "name the teacher's workdir, e.g. "
          "--config.distill.teacher_workdir=runs/digits")
  if section.get("teacher_step") is not None:
    _int(section, "teacher_step", "distill", low=0)
  if config.diffusion.p_uncond == 0:
    _fail("diffusion.p_uncond", "is 0, so the student would never learn the unconditional ε "
          "(γ = 0)", "keep the teacher's conditioning dropout, e.g. 0.2")
  scales = section.guidance_scale_range
  ok = (isinstance(scales, (tuple, list)) and len(scales) == 2
        and all(isinstance(v, numbers.Real) and math.isfinite(v) for v in scales)
        and scales[0] < scales[1])
  if not ok:
    _fail("distill.guidance_scale_range", f"must be (low, high) with low < high, got "
          f"{scales!r}", "e.g. --config.distill.guidance_scale_range='(1.0, 5.0)'")


def _dit(m, spec):
  patch = _int(m, "patch_size", "model", low=1)
  hidden = _int(m, "hidden_size", "model", low=4)
  heads = _int(m, "num_heads", "model", low=1)
  _int(m, "depth", "model", low=1)
  height, width, _ = spec.image_shape
  if height % patch or width % patch:
    _fail("model.patch_size", f"({patch}) must divide the image size {height}×{width}",
          "choose a divisor")
  if hidden % heads or hidden % 4:
    _fail("model.hidden_size", f"({hidden}) must be a multiple of 4 (the 2-D sin-cos "
          f"positions) and of num_heads ({heads})", "choose such a width")
  if "mlp_ratio" in m:
    _number(m, "mlp_ratio", "model", low=0, low_open=True)
  if "dropout" in m:
    _number(m, "dropout", "model", low=0, high=1, high_open=True)
  if m.get("learn_sigma", False):
    _fail("model.learn_sigma", "is True, but cfg-jax trains ε alone (no variance loss)",
          "set --config.model.learn_sigma=False")
  for name in ("image_shape", "num_classes", "class_dropout_prob"):
    if name in m:
      _fail(f"model.{name}", "is set by the data set and diffusion.p_uncond in training",
            f"remove model.{name}")


def _model(m, prefix, spec):
  base = _int(m, "base_channels", prefix, low=1)
  _int(m, "num_res_blocks", prefix, low=1)
  heads = _int(m, "num_heads", prefix, low=1)
  groups = _int(m, "num_groups", prefix, low=1)
  _number(m, "dropout", prefix, low=0, high=1, high_open=True)
  mult = tuple(m.channel_mult)
  if not mult or not all(isinstance(k, numbers.Integral) and k >= 1 for k in mult):
    _fail(f"{prefix}.channel_mult", f"must be positive integers, got {mult!r}",
          "e.g. --config.model.channel_mult='(1, 2)'")
  size = spec.image_shape[0]
  levels = len(mult)
  if size % 2 ** (levels - 1):
    _fail(f"{prefix}.channel_mult", f"has {levels} levels, so the image size {size} must be "
          f"divisible by 2^{levels - 1}", "use fewer levels")
  for channels in sorted({base * k for k in mult}):
    if channels % heads:
      _fail(f"{prefix}.num_heads", f"({heads}) must divide every level's channels ({channels} "
            "does not)", "choose a divisor of base_channels")
    if channels % groups:
      _fail(f"{prefix}.num_groups", f"({groups}) must divide every level's channels "
            f"({channels} does not)", "choose a divisor of base_channels")


def _diffusion(d):
  if d.schedule not in schedules.NAMES:
    _fail("diffusion.schedule", f"{d.schedule!r} is unknown",
          f"choose one of {schedules.NAMES}")
  _int(d, "num_timesteps", "diffusion", low=1)
  # 0 trains no null label: the model then has no ε(x, t, ∅), and CFG guides it by ICG or a
  # separate unconditional network. 1 would never train the classes.
  _number(d, "p_uncond", "diffusion", low=0, high=1, high_open=True)
  if d.get("min_snr_gamma") not in (None, math.inf):  # inf: the plain ε-MSE
    _number(d, "min_snr_gamma", "diffusion", low=0, low_open=True)


def _optimizer(o, prefix, num_steps):
  _number(o, "learning_rate", prefix, low=0, low_open=True)
  _int(o, "warmup_steps", prefix, low=0)
  _number(o, "weight_decay", prefix, low=0)
  _number(o, "grad_clip_norm", prefix, low=0, low_open=True)
  for name in ("b1", "b2"):
    _number(o, name, prefix, low=0, high=1, high_open=True)
  decay = o.get("decay", "constant")
  if decay not in loop.LR_DECAYS:
    _fail(f"{prefix}.decay", f"is {decay!r}", f"choose one of {loop.LR_DECAYS}")
  if decay == "cosine" and 0 < num_steps <= max(o.warmup_steps, 1):
    _fail(f"{prefix}.warmup_steps", f"({o.warmup_steps}) leaves no steps to decay over "
          f"({num_steps} in all)", "lower it, or set decay='constant'")


def _steps(values, field):
  """A tuple of step numbers, each an int >= 1 (e.g. train.keep_steps)."""
  ok = isinstance(values, (tuple, list)) and all(
      isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in values)
  if not ok:
    _fail(field, f"must be step numbers >= 1, got {values!r}", f"e.g. --config.{field}='(500,)'")


def _sampling(s, num_timesteps):
  if s.method not in sampling.METHODS:
    _fail("sampling.method", f"{s.method!r} is unknown", f"choose one of {sampling.METHODS}")
  steps = _int(s, "num_steps", "sampling", low=1)
  if isinstance(num_timesteps, numbers.Integral) and steps > num_timesteps:
    _fail("sampling.num_steps", f"({steps}) exceeds diffusion.num_timesteps ({num_timesteps})",
          "lower it")
  _number(s, "eta", "sampling", low=0)
  _int(s, "samples_per_class", "sampling", low=1)
  for name in ("guidance_scales", "classifier_scales"):
    if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in s[name]):
      _fail(f"sampling.{name}", f"must be finite numbers, got {tuple(s[name])!r}",
            "fix the listed values")


def _sampler_accepts(config, schedule) -> None:
  """The sampler's own checks of the grids' options (DDPM with η > 0, say), so they fail
  now and not after both trainings."""
  s = config.sampling
  try:
    sampling.check_options(schedule, method=s.method, num_steps=s.num_steps, eta=s.eta)
  except errors.InputError as e:
    _fail("sampling", f"cannot draw the sample grids ({str(e).rstrip('.')})",
          "fix --config.sampling.method, num_steps or eta")
