"""Guided DDIM, DDPM and DPM-Solver++(2M) sampling as one compiled `lax.scan`.

Notation (the names in the code, the symbols of the papers; in the style of maxdiffusion's
`scheduling_ddim_flax.py`):

| code         | symbol      | meaning                                                      |
| ------------ | ----------- | ------------------------------------------------------------ |
| `t`, `t_prev`| t, t−1      | the visited timestep and the next one (−1: past the end)     |
| `abar`       | ᾱ_t         | `schedule.alphas_cumprod[t]`                                 |
| `abar_prev`  | ᾱ_{t−1}     | ᾱ at the next visited timestep; 1 after the last             |
| `signal`     | sqrt(ᾱ_t)   | `Schedule.scales(t)[0]`; α_t in DPM-Solver's notation        |
| `noise_std`  | sqrt(1−ᾱ_t) | `Schedule.scales(t)[1]`; σ_t in DPM-Solver's notation        |
| `beta`       | β_t         | 1 − α_t, α_t = ᾱ_t / ᾱ_{t−1}: one step of the respaced chain |
| `eps`        | ε_θ(x_t)    | the (guided) noise prediction ε̂                              |
| `x0`         | x̂0 (f_θ)   | the predicted x_0, "predicted x0" of Song et al. eq. (12)    |
| `sigma`      | σ_t(η)      | DDIM's noise scale, Song et al. eq. (16)                     |
| `variance`   | β̃_t        | the DDPM posterior variance, Ho et al. eq. (7)               |
| `lam`        | λ_t         | log(sqrt(ᾱ_t)/sqrt(1 − ᾱ_t)), half the log-SNR (DPM-Solver) |
| `grad`       | s·∇log p_φ  | the classifier gradient s·∇_{x_t} log p_φ(y | x_t)           |

Conventions (kept identical to diffusers and guided-diffusion so trajectories agree):

* `timestep_spacing` has diffusers' definitions: "leading" (the default) visits
  i·(T // num_steps), "trailing" round(T − i·T/num_steps) − 1 (always starting at T − 1),
  "linspace" round(linspace(0, T − 1, num_steps)). DPM-Solver++ takes the definitions of
  diffusers' `DPMSolverMultistepScheduler`, whose "leading" and "linspace" lay num_steps + 1
  points and drop t = 0. Each step goes to the next visited timestep and ᾱ = 1 after the last
  (diffusers' `set_alpha_to_one`, guided-diffusion's `alphas_cumprod_prev`). x_T ~ N(0, I) is
  only right where ᾱ ≈ 0: a "leading" grid whose first timestep has ᾱ > MAX_START_ALPHA_CUMPROD
  (few steps: n = 4 starts at t = 750, ᾱ = 0.14 on the cosine schedule) is an error when asked
  for explicitly and a warning for the default.
* Coefficients come from the schedule's float64-derived tables sqrt(ᾱ) and sqrt(1 − ᾱ)
  (`Schedule.scales`; exactly (1, 0) past the last step), never from 1 − ᾱ in float32.
* DDPM on a respaced grid uses β_t = 1 − ᾱ_t / ᾱ_{t−1} (guided-diffusion's `respace.py`) and
  the posterior ("fixed small") variance β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t).
* `clip_denoised` clips the predicted x0 to [−1, 1]; `dynamic_threshold=p` replaces it with
  Imagen's s = max(1, quantile_p(|x0|)), x0 ← clip(x0, −s, s)/s. DDIM then re-derives ε
  from the new x0, as guided-diffusion (and GLIDE) do.
* Guidance rules live in `cfg_jax.guidance`; `guidance_scale=γ` is `guidance.CFG(scale=γ)`:
  ε̂ = ε(x,t,∅) + γ·(ε(x,t,y) − ε(x,t,∅)). γ = 0 is unconditional, γ = 1 conditional; Ho &
  Salimans' w equals γ − 1. Only the passes the rule needs run: a concrete γ = 1 runs the
  conditional pass alone, γ = 0 the unconditional one, anything else both in one batched call.
* Classifier guidance with g = s·∇_{x_t} log p_φ(y | x_t), taken at x_t: DDIM and DPM-Solver++
  shift the score, ε̂ ← ε̂ − sqrt(1 − ᾱ_t)·g (`score_shift`: Dhariwal & Nichol Algorithm 2,
  guided-diffusion's `condition_score`); DDPM shifts the mean, μ ← μ + β̃_t·g (Algorithm 1,
  `condition_mean`).

Guidance scales (and every numeric field of a rule), labels, η, the key and x_T are traced: a
new value never recompiles. A 1-D array of G scales returns (G, B, ...) from one program. The
structure (ε-function, rule kind, method, spacing, number of steps, clipping, shapes) is
static. Pass the same ε-function object each call (or a `jax.tree_util.Partial` over its
parameters) to reuse the compiled sampler.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Callable, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from cfg_jax import diffusion, errors
from cfg_jax import guidance as guidance_lib
from cfg_jax.schedules import Schedule

EpsFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t, t, y) -> ε
ClassifierFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t, t) -> logits

METHODS = ("ddim", "ddpm", "dpmpp_2m")
SPACINGS = ("leading", "trailing", "linspace")
# x_T ~ N(0, I) is a sample of x_t only where ᾱ_t ≈ 0; a grid may start at most this far off.
MAX_START_ALPHA_CUMPROD = 1e-2

per_example = diffusion.per_example


def timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading",
              method: str = "ddim") -> np.ndarray:
  """The visited timesteps, largest first, as diffusers' schedulers lay them out.

  DDIM/DDPM follow `DDIMScheduler`; "dpmpp_2m" follows `DPMSolverMultistepScheduler`, whose
  "leading" and "linspace" lay num_steps + 1 points and drop the last (t = 0).
  """
  T, n = num_timesteps, num_steps
  multistep = method == "dpmpp_2m"
  if spacing == "leading":
    if multistep:
      ts = np.arange(n, 0, -1) * (T // (n + 1))
    else:
      ts = np.arange(n - 1, -1, -1) * (T // n)
  elif spacing == "trailing":
    # diffusers' round(arange(T, 0, −T/n)) − 1, written so float error never adds a point.
    ts = np.round(T - np.arange(n) * (T / n)) - 1
  elif spacing == "linspace":
    if multistep:
      ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    else:
      ts = np.linspace(0, T - 1, n).round()[::-1]
  else:
    raise errors.InputError(f"Unknown timestep_spacing {spacing!r}; use one of {SPACINGS}.")
  return np.asarray(ts, np.int32)


def sample(
    key,
    eps_fn: EpsFn,
    schedule: Schedule,
    labels,
    *,
    image_shape: Optional[Sequence[int]] = None,
    x_init=None,
    method: str = "ddim",
    num_steps: int = 50,
    eta=0.0,
    clip_denoised: bool = True,
    dynamic_threshold=None,
    timestep_spacing: Optional[str] = None,
    guidance_scale=None,
    guidance=None,
    null_label: Optional[int] = None,
    num_classes: Optional[int] = None,
    classifier_fn: Optional[ClassifierFn] = None,
    classifier_scale=0.0,
):
  """Draws x_0 of shape (B, *image_shape) for the B given labels.

  Args:
    key: PRNG key; draws x_T (unless `x_init` is given) and the sampler's noise.
    eps_fn: `eps_fn(x_t, t, y) -> ε`, t int32 (B,) timesteps of the full schedule, y int32
      (B,) labels where `y == null_label` means "no label".
    schedule: the noise schedule the model was trained with.
    labels: int (B,) class labels, each in 0..num_classes − 1 or null_label (without
      num_classes: 0..null_label).
    image_shape: shape of one sample, e.g. (8, 8, 1); or give `x_init`.
    x_init: the starting x_T, shape (B, *image_shape).
    method: "ddim", "ddpm" (ancestral, posterior variance) or "dpmpp_2m" (DPM-Solver++(2M)).
    num_steps: number of denoising steps, 1..T.
    eta: DDIM's η (0 is deterministic). Must be 0 for DDPM and DPM-Solver++.
    clip_denoised: clip the predicted x0 to [−1, 1] at every step.
    dynamic_threshold: Imagen's percentile p in (0, 1] (replaces clipping), or None (off).
    timestep_spacing: "leading" (None: leading, warning instead of raising for a grid that
      starts far from pure noise), "trailing" or "linspace"; see the module docstring.
    guidance_scale: γ of plain classifier-free guidance, a scalar or a 1-D array of G scales;
      None means 1 (or `guidance`). Needs `null_label` unless it is 1.
    guidance: a rule of `cfg_jax.guidance` (CFG, APG, CFGPlusPlus, Autoguidance), instead of
      `guidance_scale`; its scale may be a 1-D array of G scales too.
    null_label: the label id that means "unconditional" (num_classes for our models).
    num_classes: the number of classes the model knows, to refuse other labels (an embedding
      table looked up out of range gives NaN); None checks only against null_label.
    classifier_fn: `classifier_fn(x_t, t) -> logits` of a noisy classifier p_φ(y | x_t).
    classifier_scale: s, the classifier-guidance scale (a concrete 0 computes no gradient and
      compiles without the classifier; a traced one always computes it).

  Returns:
    (B, *image_shape) samples, or (G, B, *image_shape) for G scales (the same x_T for each).

  Raises:
    InputError: for arguments that cannot work, before anything is traced.
    NonFiniteError: when the samples hold NaN or infinity: one reduction, after which the
      call waits for the samples (skipped inside an outer `jit`/`vmap`, whose caller gets the
      values).
  """
  labels = jnp.asarray(labels)
  if guidance is not None and guidance_scale is not None:
    raise errors.InputError("Give guidance (a rule) or guidance_scale (plain CFG), not both.")
  if guidance is None:
    _check_scale_arg(guidance_scale)
    guidance = guidance_lib.CFG(scale=1.0 if guidance_scale is None else guidance_scale)
  spacing, warning = _check_options(schedule, method, num_steps, eta, timestep_spacing,
                                    dynamic_threshold)
  _validate(labels, image_shape, x_init, method, guidance, null_label, num_classes,
            classifier_fn, classifier_scale)
  if warning:  # the default keeps today's samples; say it loudly instead of breaking callers
    warnings.warn(warning, UserWarning, stacklevel=2)
  if isinstance(guidance, guidance_lib.Autoguidance):
    guidance = guidance.replace(weak_eps_fn=_as_partial(guidance.weak_eps_fn))
  passes = _passes(guidance, null_label)  # decided on the concrete values, before tracing
  # γ = 0 and γ = 1 run one pass of the same compiled program, on ∅ or on the labels.
  one_pass_labels = jnp.full_like(labels, null_label) if passes == "uncond" else labels
  passes = "one" if passes in ("cond", "uncond") else passes
  scale = _concrete(classifier_scale)
  if scale is not None and scale.shape == () and scale == 0:
    classifier_fn = None  # s = 0 computes no gradient: a program without the classifier
  if image_shape is None:
    image_shape = x_init.shape[1:]
  samples = _sample_jit(
      key,
      _as_partial(eps_fn),
      None if classifier_fn is None else _as_partial(classifier_fn),
      schedule,
      labels.astype(jnp.int32),
      one_pass_labels.astype(jnp.int32),
      None if x_init is None else jnp.asarray(x_init, jnp.float32),
      guidance_lib.as_float32(guidance),
      jnp.asarray(classifier_scale, jnp.float32),
      jnp.asarray(eta, jnp.float32),
      None if dynamic_threshold is None else jnp.asarray(dynamic_threshold, jnp.float32),
      image_shape=tuple(int(d) for d in image_shape),
      method=method,
      num_steps=num_steps,
      spacing=spacing,
      clip_denoised=bool(clip_denoised),
      null_label=None if null_label is None else int(null_label),
      passes=passes,
  )
  _check_finite(samples, len(image_shape))
  return samples


def check_options(schedule, *, method: str = "ddim", num_steps: int = 50, eta=0.0,
                  timestep_spacing: Optional[str] = None, dynamic_threshold=None) -> None:
  """Raises an InputError for sampler options that cannot work with `schedule`.

  `sample` runs the same checks; call this to fail before slow work that comes first (a
  sweep trains its evaluation network before it samples).
  """
  _check_options(schedule, method, num_steps, eta, timestep_spacing, dynamic_threshold)


def guided_eps(rule, passes, eps_fn, ctx: guidance_lib.StepContext, labels, null_label, state):
  """(ε̂, ε̂_renoise, state) of the rule, from both passes ("both") or the main and the weak
  model ("main+weak")."""
  x_t, t = ctx.x_t, ctx.t
  if passes not in ("both", "main+weak"):
    raise ValueError(f"guided_eps runs 'both' or 'main+weak' passes, not {passes!r}.")
  if passes == "main+weak":  # autoguidance: two models, both conditional
    main = _call(eps_fn, x_t, t, labels)
    weak = _call(rule.weak_eps_fn, x_t, t, labels)
    return rule.combine(ctx, main, weak, state)
  eps_cond, eps_uncond = _both_passes(eps_fn, x_t, t, labels, null_label)
  return rule.combine(ctx, eps_cond, eps_uncond, state)


def classifier_gradient(classifier_fn: ClassifierFn, x_t, t, y, scale):
  """g = s·∇_{x_t} log softmax(classifier_fn(x_t, t))[y].

  A label outside the classifier's classes (the null label) gets no guidance. `sample`
  drops the classifier when s is a concrete 0, so that case compiles without the gradient
  and this needs no `lax.cond` (which `vmap` would turn into computing both branches).
  """

  def total_log_prob(x):
    logits = classifier_fn(x, t)
    chex.assert_rank(logits, 2)  # (B, num_classes)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    num_classes = log_probs.shape[-1]
    picked = jnp.take_along_axis(log_probs, jnp.minimum(y, num_classes - 1)[:, None], axis=-1)
    return jnp.sum(jnp.where(y[:, None] < num_classes, picked, 0.0))

  # Examples are independent, so the gradient of the summed log-probability is per-example.
  return scale * jax.grad(total_log_prob)(x_t)


def denoise_x0(x0, clip_denoised, dynamic_threshold=None):
  """Clips x0 to [−1, 1], or applies Imagen's dynamic thresholding (Saharia et al. 2022).

  Thresholding: s = max(1, quantile_p(|x0|)) per example, x0 ← clip(x0, −s, s)/s (diffusers'
  `_threshold_sample` without its upper cap on s). Its output lies in [−1, 1] already.
  """
  if dynamic_threshold is not None:
    flat = jnp.abs(x0).reshape(x0.shape[0], -1)
    s = jnp.maximum(jnp.quantile(flat, dynamic_threshold, axis=-1), 1.0)
    s = per_example(s, x0)
    return jnp.clip(x0, -s, s) / s
  if clip_denoised:
    return jnp.clip(x0, -1.0, 1.0)
  return x0


def score_shift(schedule, t, grad):
  """sqrt(1 − ᾱ_t)·g, what classifier guidance takes off ε: ε̂ = ε − sqrt(1 − ᾱ_t)·g.

  Dhariwal & Nichol's Algorithm 2 (guided-diffusion's `condition_score`): since
  ∇_{x_t} log p(x_t) = −ε/sqrt(1 − ᾱ_t), adding g = s·∇_{x_t} log p_φ(y | x_t) to the score
  shifts ε by −sqrt(1 − ᾱ_t)·g. DDIM and DPM-Solver++ step with the shifted ε̂.
  """
  _, noise_std = schedule.scales(t)  # sqrt(1 − ᾱ_t), the float64-derived table
  return per_example(noise_std, grad) * grad


def ddim_step(schedule, x_t, t, t_prev, eps, grad, eta, noise, clip_denoised,
              dynamic_threshold=None, eps_renoise=None):
  """One DDIM step from t to t_prev (Song et al. eq. (12)), with Algorithm 2's score shift.

  `eps_renoise` (CFG++) replaces ε in the direction pointing to x_t; None uses ε.
  """
  _, noise_std = schedule.scales(t)  # sqrt(1 − ᾱ_t)
  signal_prev, noise_std_prev = schedule.scales(t_prev)  # sqrt(ᾱ_{t−1}), sqrt(1 − ᾱ_{t−1})
  x0 = diffusion.predict_x0_from_eps(schedule, x_t, t, eps)  # "predicted x0", eq. (12)
  if clip_denoised or dynamic_threshold is not None:
    x0 = denoise_x0(x0, clip_denoised, dynamic_threshold)
    # ε consistent with the clipped x0 and x_t (guided-diffusion's ddim_sample).
    new_eps = diffusion.predict_eps_from_x0(schedule, x_t, t, x0)
    if eps_renoise is not None:
      eps_renoise = eps_renoise + (new_eps - eps)  # CFG++: the same correction
    eps = new_eps
  if grad is not None:
    shift = score_shift(schedule, t, grad)
    eps = eps - shift
    if eps_renoise is not None:
      eps_renoise = eps_renoise - shift
    x0 = diffusion.predict_x0_from_eps(schedule, x_t, t, eps)  # Algorithm 2's x0 from ε̂
  if eps_renoise is None:
    eps_renoise = eps
  beta = _respaced_beta(schedule, t, t_prev)  # β_t = 1 − ᾱ_t/ᾱ_{t−1}
  # σ_t(η) = η·sqrt((1 − ᾱ_{t−1})/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_{t−1}), Song et al. eq. (16).
  sigma = eta * (noise_std_prev / noise_std) * jnp.sqrt(beta)
  # sqrt(1 − ᾱ_{t−1} − σ_t²), the "direction pointing to x_t" of eq. (12), written as
  # sqrt(1 − ᾱ_{t−1})·sqrt(1 − η²β_t/(1 − ᾱ_t)): the table value itself at η = 0.
  direction = noise_std_prev * jnp.sqrt(jnp.maximum(1.0 - eta**2 * beta / noise_std**2, 0.0))
  # x_{t−1} = sqrt(ᾱ_{t−1})·x̂0 + sqrt(1 − ᾱ_{t−1} − σ_t²)·ε + σ_t·z, eq. (12).
  return (per_example(signal_prev, x_t) * x0 + per_example(direction, x_t) * eps_renoise
          + per_example(sigma, x_t) * noise)


def ddpm_step(schedule, x_t, t, t_prev, eps, grad, noise, clip_denoised, dynamic_threshold=None):
  """One ancestral step from t to t_prev on the respaced chain, with Algorithm 1's mean shift.

  Samples the posterior q(x_{t−1} | x_t, x̂0) of Ho et al. eqs. (6)-(7).
  """
  signal, noise_std = schedule.scales(t)  # sqrt(ᾱ_t), sqrt(1 − ᾱ_t)
  signal_prev, noise_std_prev = schedule.scales(t_prev)  # the same at t − 1
  beta = _respaced_beta(schedule, t, t_prev)  # β_t = 1 − α_t, α_t = ᾱ_t/ᾱ_{t−1}
  noise_ratio_sq = (noise_std_prev / noise_std) ** 2  # (1 − ᾱ_{t−1})/(1 − ᾱ_t)
  x0 = diffusion.predict_x0_from_eps(schedule, x_t, t, eps)  # Ho et al. eq. (15) solved for x0
  x0 = denoise_x0(x0, clip_denoised, dynamic_threshold)
  # μ̃_t = sqrt(ᾱ_{t−1})β_t/(1 − ᾱ_t)·x0 + sqrt(α_t)(1 − ᾱ_{t−1})/(1 − ᾱ_t)·x_t, eq. (7).
  coef_x0 = signal_prev * beta / noise_std**2
  coef_xt = (signal / signal_prev) * noise_ratio_sq
  # β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t, eq. (7).
  variance = beta * noise_ratio_sq
  mean = per_example(coef_x0, x_t) * x0 + per_example(coef_xt, x_t) * x_t
  if grad is not None:
    # Dhariwal & Nichol Algorithm 1: μ + s·Σ·∇log p_φ(y | x_t), with Σ = β̃_t.
    mean = mean + per_example(variance, x_t) * grad
  # x_{t−1} ~ N(μ̃_t, β̃_t I), eq. (6); β̃ = 0 at the last step (ᾱ_{t−1} = 1): no noise there.
  return mean + per_example(jnp.sqrt(variance), x_t) * noise


def dpmpp_2m_step(schedule, x_t, t, t_prev, t_last, eps, grad, x0_last, clip_denoised,
                  dynamic_threshold=None):
  """One DPM-Solver++(2M) step from t to t_prev (Lu et al. 2022, Algorithm 2).

  `t_last` is the timestep visited before t (−1 at the first step) where `x0_last` was
  predicted. The first step and the final step to ᾱ = 1 (σ = 0) are first order; the final
  one returns x̂0. Returns (x_{t_prev}, x̂0).
  """
  signal, noise_std = schedule.scales(t)  # α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t)
  signal_prev, noise_std_prev = schedule.scales(t_prev)  # the target
  signal_last, noise_std_last = schedule.scales(t_last)  # the step before
  if grad is not None:
    eps = eps - score_shift(schedule, t, grad)  # before x̂0 is formed
  x0 = diffusion.predict_x0_from_eps(schedule, x_t, t, eps)  # the data prediction x_θ
  x0 = denoise_x0(x0, clip_denoised, dynamic_threshold)
  final = t_prev < 0  # to σ = 0, where λ = ∞
  first = t_last < 0
  lam = _lam(signal, noise_std)  # λ_t = log(α_t/σ_t)
  lam_prev = _lam(jnp.where(final, 1.0, signal_prev), jnp.where(final, 1.0, noise_std_prev))
  lam_last = _lam(jnp.where(first, 1.0, signal_last), jnp.where(first, 1.0, noise_std_last))
  h = lam_prev - lam  # h_i = λ_{t_i} − λ_{t_{i−1}}
  phi = jnp.expm1(-h)  # e^{−h} − 1
  ratio = noise_std_prev / noise_std  # σ_{t_i}/σ_{t_{i−1}}
  r = (lam - lam_last) / h  # r_i = h_{i−1}/h_i
  # D_i = (1 + 1/(2r_i))·x̂0_i − 1/(2r_i)·x̂0_{i−1}; the first step uses D = x̂0 (DPM-Solver++(1)).
  half_inv_r = per_example(jnp.where(first, 0.0, 0.5 / r), x0)
  d = (1.0 + half_inv_r) * x0 - half_inv_r * x0_last
  # x̃_{t_i} = (σ_{t_i}/σ_{t_{i−1}})·x̃_{t_{i−1}} − α_{t_i}(e^{−h_i} − 1)·D_i.
  x_prev = (per_example(ratio, x_t) * x_t
            - per_example(signal_prev * phi, x_t) * d)
  return jnp.where(per_example(final, x_t), x0, x_prev), x0


def _sample_impl(key, eps_fn, classifier_fn, schedule, labels, one_pass_labels, x_init, rule,
                 classifier_scale, eta, dynamic_threshold, *, image_shape, method, num_steps,
                 spacing, clip_denoised, null_label, passes):
  init_key, loop_key = jax.random.split(key)
  batch = labels.shape[0]
  if x_init is None:
    x_init = jax.random.normal(init_key, (batch, *image_shape), jnp.float32)
  ts = timesteps(schedule.num_timesteps, num_steps, spacing, method)
  ts_prev = np.append(ts[1:], -1)  # the next visited timestep; −1: ᾱ = 1
  ts_last = np.insert(ts[:-1], 0, -1)  # the one visited before (DPM-Solver++'s history)
  xs = tuple(jnp.asarray(v, jnp.int32) for v in (ts, ts_prev, ts_last))

  def run(rule):
    def step(carry, times):
      x_t, state, x0_last = carry
      t, t_prev, t_last = (jnp.full((batch,), v, jnp.int32) for v in times)
      ctx = guidance_lib.StepContext(schedule, x_t, t)
      if passes == "one":  # γ = 1 or γ = 0: ε̂ = ε(x_t, t, y) or ε(x_t, t, ∅)
        eps = eps_renoise = _call(eps_fn, x_t, t, one_pass_labels)
      else:
        eps, eps_renoise, state = guided_eps(rule, passes, eps_fn, ctx, labels, null_label,
                                             state)
      grad = None
      if classifier_fn is not None:
        grad = classifier_gradient(classifier_fn, x_t, t, labels, classifier_scale)
      if method == "dpmpp_2m":
        x_prev, x0_last = dpmpp_2m_step(schedule, x_t, t, t_prev, t_last, eps, grad, x0_last,
                                        clip_denoised, dynamic_threshold)
        return (x_prev, state, x0_last), None
      # The same noise for every scale of a sweep, as before this sampler had rules.
      noise = jax.random.normal(jax.random.fold_in(loop_key, times[0]), x_t.shape, x_t.dtype)
      if method == "ddim":
        renoise = eps_renoise if isinstance(rule, guidance_lib.CFGPlusPlus) else None
        x_prev = ddim_step(schedule, x_t, t, t_prev, eps, grad, eta, noise, clip_denoised,
                           dynamic_threshold, renoise)
      else:
        x_prev = ddpm_step(schedule, x_t, t, t_prev, eps, grad, noise, clip_denoised,
                           dynamic_threshold)
      return (x_prev, state, x0_last), None

    x0_init = jnp.zeros_like(x_init) if method == "dpmpp_2m" else ()
    (x_0, _, _), _ = jax.lax.scan(step, (x_init, rule.init_state(x_init), x0_init), xs)
    return x_0

  if jnp.ndim(rule.scale) == 1:  # a sweep: one program, vmapped over the scales
    return jax.vmap(lambda scale: run(rule.replace(scale=scale)))(rule.scale)
  return run(rule)


_STATIC_ARGNAMES = ("image_shape", "method", "num_steps", "spacing", "clip_denoised",
                    "null_label", "passes")
_sample_jit = jax.jit(_sample_impl, static_argnames=_STATIC_ARGNAMES)


def _call(eps_fn, x_t, t, y):
  eps = eps_fn(x_t, t, y)
  chex.assert_equal_shape([eps, x_t])  # a wrong shape would broadcast silently
  return eps


def _both_passes(eps_fn, x_t, t, y, null_label):
  """(ε_c, ε_u) from one batched 2B call, as maxdiffusion does."""
  both = eps_fn(
      jnp.concatenate([x_t, x_t]),
      jnp.concatenate([t, t]),
      jnp.concatenate([y, jnp.full_like(y, null_label)]),
  )
  chex.assert_shape(both, (2 * x_t.shape[0], *x_t.shape[1:]))
  return jnp.split(both, 2)


def uses_null_label(rule) -> bool:
  """Whether sampling with `rule` reads ε(x, t, ∅): all but autoguidance and a concrete plain
  γ = 1 (which runs the conditional pass alone)."""
  return _passes(rule, null_label=0) not in ("cond", "main+weak")


def _passes(rule, null_label) -> str:
  """Which ε passes a step runs: "cond", "uncond", "both" (one 2B call) or "main+weak".

  `sample` runs "cond" and "uncond" as one program ("one" pass, on the labels or on ∅).

  Decided on concrete values only, so a traced or swept scale always runs both passes and
  each case compiles once, never once per value.
  """
  if isinstance(rule, guidance_lib.Autoguidance):
    return "main+weak"
  if not isinstance(rule, guidance_lib.CFG):
    return "both"
  if null_label is None:
    return "cond"
  scale, rescale = _concrete(rule.scale), _concrete(rule.rescale)
  if scale is not None and scale.shape == ():
    if scale == 1 and rule.weight_schedule == "constant":
      return "cond"  # γ_t = 1 inside the interval and out: ε̂ = ε_c, rescaled or not
    if scale == 0 and rule.interval is None and rescale is not None and rescale == 0:
      return "uncond"  # γ_t = 0 everywhere: ε̂ = ε_u
  return "both"


def _abar(schedule, t):
  """ᾱ_t, and 1 past the last step (t < 0)."""
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def _respaced_beta(schedule, t, t_prev):
  """β_t = 1 − ᾱ_t/ᾱ_{t−1} of the respaced chain, as (ᾱ_{t−1} − ᾱ_t)/ᾱ_{t−1}.

  The difference is taken in whichever of ᾱ and 1 − ᾱ (the float64-derived table) is small:
  in float32 the other has lost the digits (ᾱ_0 ≈ 1 keeps 1 − ᾱ_0 to only 6e-4).
  """
  abar, abar_prev = _abar(schedule, t), _abar(schedule, t_prev)
  _, noise_std = schedule.scales(t)
  _, noise_std_prev = schedule.scales(t_prev)
  diff = jnp.where(abar_prev > 0.5, noise_std**2 - noise_std_prev**2, abar_prev - abar)
  return diff / abar_prev


def _lam(signal, noise_std):
  """λ = log(sqrt(ᾱ)/sqrt(1 − ᾱ)), DPM-Solver's half log-SNR, from the tables' α and σ."""
  return jnp.log(signal) - jnp.log(noise_std)


def _check_finite(samples, image_ndim):
  """Raises a NonFiniteError for NaN or infinite samples, where they are concrete values."""
  if isinstance(samples, jax.core.Tracer):
    return  # inside the caller's jit or vmap: the caller gets the values
  bad = int(_count_non_finite(samples, image_ndim))
  if bad:
    total = math.prod(samples.shape[:samples.ndim - image_ndim])
    raise errors.NonFiniteError(
        f"{bad} of {total} samples hold NaN or infinite values; check that every label is a "
        "class the model knows (pass num_classes to check) and that eps_fn and classifier_fn "
        "are finite.")


@partial(jax.jit, static_argnums=1)
def _count_non_finite(samples, image_ndim):
  pixels = samples.reshape(samples.shape[:samples.ndim - image_ndim] + (-1,))
  return jnp.sum(~jnp.all(jnp.isfinite(pixels), axis=-1))


def _as_partial(fn):
  # A Partial is a pytree whose treedef holds the function: jit traces its bound arrays
  # (e.g. model parameters) and caches on the function's identity.
  return fn if isinstance(fn, Partial) else Partial(fn)


def _concrete(value):
  """The value as a NumPy array, or None while it is being traced."""
  try:
    return np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_scale_arg(guidance_scale):
  concrete = None if guidance_scale is None else _concrete(guidance_scale)
  if concrete is not None and (concrete.ndim > 1 or concrete.size == 0
                               or not np.all(np.isfinite(concrete))):
    shown = concrete.tolist() if concrete.ndim <= 1 and concrete.size <= 8 else concrete.shape
    raise errors.InputError(f"guidance_scale must be a finite scalar or a 1-D array of scales, got "
                            f"{shown}.")


def _check_spacing(schedule, method, num_steps, spacing):
  """(the spacing to use, a warning or None); raises for a bad spacing asked for explicitly.

  x_T ~ N(0, I) is a sample of x_t only where ᾱ_t ≈ 0, so a grid that starts where ᾱ is
  larger (a "leading" grid with few steps, or with T % num_steps != 0) starts from the wrong
  distribution. "trailing" and "linspace" always start at T − 1.
  """
  explicit = spacing is not None
  spacing = "leading" if spacing is None else spacing
  if spacing not in SPACINGS:
    raise errors.InputError(f"Unknown timestep_spacing {spacing!r}; use one of {SPACINGS}.")
  T = schedule.num_timesteps
  ts = timesteps(T, num_steps, spacing, method)
  if np.any(np.diff(ts) >= 0) or ts[-1] < 0:
    raise errors.InputError(f"num_steps={num_steps} repeats timesteps with timestep_spacing="
                            f"{spacing!r}; use fewer steps.")
  table = _concrete(schedule.alphas_cumprod)  # None for a traced schedule: nothing to check
  start = int(ts[0])
  if table is None or start == T - 1 or table[start] <= MAX_START_ALPHA_CUMPROD:
    return spacing, None
  message = (f"timestep_spacing={spacing!r} with num_steps={num_steps} starts at t={start} of "
             f"T={T}, where ᾱ={float(table[start]):.3g} > {MAX_START_ALPHA_CUMPROD:g}, so x_T ~ "
             f"N(0, I) is not pure noise there; use timestep_spacing='trailing' (or 'linspace'), "
             f"or more steps.")
  if explicit:
    raise errors.InputError(message)
  return spacing, message


def _check_options(schedule, method, num_steps, eta, spacing, dynamic_threshold):
  """(the spacing to use, a warning or None) for the sampler's options; raises for bad ones."""
  if method not in METHODS:
    raise errors.InputError(f"Unknown sampling method {method!r}; use one of {METHODS}.")
  num_timesteps = schedule.num_timesteps
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
    raise errors.InputError(f"num_steps must be an int in 1..{num_timesteps}, got {num_steps!r}.")
  spacing, warning = _check_spacing(schedule, method, num_steps, spacing)
  eta_value = _concrete(eta)
  if eta_value is not None and (eta_value.shape != () or not np.isfinite(eta_value)):
    raise errors.InputError(f"eta must be a finite scalar, got {eta!r}.")
  if eta_value is not None and eta_value < 0:
    raise errors.InputError(f"eta must be >= 0, got {float(eta_value)}.")
  if method != "ddim" and eta_value is not None and eta_value != 0:
    raise errors.InputError(f"eta applies to method='ddim' only; {method} has no η.")
  if dynamic_threshold is not None:
    p = _concrete(dynamic_threshold)
    if p is not None and (p.shape != () or not 0 < p <= 1):
      raise errors.InputError(f"dynamic_threshold must be a percentile in (0, 1] or None, got "
                              f"{dynamic_threshold!r}.")
  return spacing, warning


def _validate(labels, image_shape, x_init, method, rule, null_label, num_classes, classifier_fn,
              classifier_scale):
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise errors.InputError(f"labels must be a 1-D integer array, got {labels.dtype} "
                            f"{labels.shape}.")
  for name, value in (("null_label", null_label), ("num_classes", num_classes)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
      raise errors.InputError(f"{name} must be a non-negative int or None, got {value!r}.")
  _check_label_range(_concrete(labels), null_label, num_classes)
  if x_init is None and image_shape is None:
    raise errors.InputError("Give image_shape (the shape of one sample) or x_init (x_T).")
  if x_init is not None:
    x_shape = tuple(np.shape(x_init))
    if not x_shape or x_shape[0] != labels.shape[0]:
      raise errors.InputError(f"x_init has shape {x_shape}; its leading axis must equal the "
                              f"number of labels ({labels.shape[0]}).")
    if image_shape is not None and tuple(image_shape) != x_shape[1:]:
      raise errors.InputError(f"x_init shape {x_shape} does not match image_shape "
                              f"{tuple(image_shape)}.")
  cls_scale = _concrete(classifier_scale)
  if cls_scale is not None and (cls_scale.shape != () or not np.isfinite(cls_scale)):
    raise errors.InputError(f"classifier_scale must be a finite scalar, got "
                            f"{classifier_scale!r}.")
  _validate_rule(rule, method, null_label)
  if classifier_fn is None and cls_scale is not None and cls_scale != 0:
    raise errors.InputError("classifier_scale is non-zero but no classifier_fn was given.")


def _check_label_range(labels, null_label, num_classes):
  """Labels index the model's class embedding: one past its table would sample NaN."""
  if labels is None or not labels.size:
    return  # traced labels: the caller's to check
  if num_classes is not None:
    ok = (labels >= 0) & (labels < num_classes)
    if null_label is not None:
      ok |= labels == null_label
    null = f" or {null_label} (null_label)" if null_label is not None else ""
    limit = f"0..{num_classes - 1} (num_classes={num_classes}){null}"
  elif null_label is not None:
    ok = (labels >= 0) & (labels <= null_label)
    limit = f"0..{null_label} (null_label)"
  else:
    ok = labels >= 0
    limit = "non-negative (pass num_classes to bound them)"
  bad = labels[~ok]
  if bad.size:
    raise errors.InputError(f"label {int(bad[0])} is out of range; labels must be {limit}.")


def _validate_rule(rule, method, null_label):
  if not isinstance(rule, guidance_lib.RULES):
    names = ", ".join(r.__name__ for r in guidance_lib.RULES)
    raise errors.InputError(f"guidance must be one of cfg_jax.guidance's {names}; got "
                     f"{type(rule).__name__}.")
  rule.validate()  # again: the rule may have been built from traced values
  name = type(rule).__name__
  if isinstance(rule, guidance_lib.CFGPlusPlus) and method != "ddim":
    raise errors.InputError(f"CFGPlusPlus works with method='ddim' only, got method={method!r}.")
  if isinstance(rule, guidance_lib.Autoguidance):
    if rule.weak_eps_fn is None:
      raise errors.InputError("Autoguidance needs weak_eps_fn, the weaker model's ε-function.")
    return
  if null_label is None:
    scale = _concrete(rule.scale)
    plain = isinstance(rule, guidance_lib.CFG) and rule.weight_schedule == "constant"
    if not plain or (scale is not None and np.any(scale != 1)):
      shown = f"guidance_scale={scale.tolist()}" if plain else name
      raise errors.InputError(f"{shown} needs null_label (the label id the model was trained with "
                              "for 'no label').")
