"""Guided DDIM, DDPM and DPM-Solver++(2M) sampling as one compiled `lax.scan`.

`sample` is the one public entry. Its parts: `checks` (every argument check), `respacing`
(the visited timesteps and the respaced β), `guided` (the guided ε̂ of a step and the
classifier gradient), one module per solver (`ddim`, `ddpm`, `dpm_solver`), `clipping`
(x0 clipping and thresholding) and `loop` (the compiled scan).

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
| `step_noise_std` | σ_t(η)  | DDIM's noise scale, Song et al. eq. (16)                     |
| `variance`   | β̃_t or Σ   | the DDPM posterior variance, Ho et al. eq. (7), or learned   |
| `values`     | v           | the learned-variance output, Σ from Nichol & Dhariwal eq. (15)|
| `sigma`      | σ           | sqrt((1 − ᾱ_t)/ᾱ_t), the noise level of guidance intervals   |
| `lam`        | λ_t         | log(sqrt(ᾱ_t)/sqrt(1 − ᾱ_t)), half the log-SNR (DPM-Solver)  |
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
  A guidance-distilled student (`guidance.Distilled(γ)`) runs one pass at any γ.
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

import warnings
from typing import Optional, Sequence

import jax.numpy as jnp
from jax.tree_util import Partial

from cfg_jax import errors
from cfg_jax.guidance import CFG, Autoguidance, IndependentCondition, as_float32
from cfg_jax.sampling import checks, loop
from cfg_jax.sampling.checks import METHODS, check_options
from cfg_jax.sampling.guided import ClassifierFn, EpsFn, concrete, passes_needed
from cfg_jax.sampling.respacing import SPACINGS, timesteps
from cfg_jax.schedules import Schedule

__all__ = ["METHODS", "SPACINGS", "check_options", "sample", "timesteps"]


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
    learned_variance: bool = False,
    guided_channels: Optional[int] = None,
):
  """Draws x_0 of shape (B, *image_shape) for the B given labels.

  Args:
    key: PRNG key; draws x_T (unless `x_init` is given) and the sampler's noise.
    eps_fn: `eps_fn(x_t, t, y) -> ε`, t int32 (B,) timesteps of the full schedule, y int32
      (B,) labels where `y == null_label` means "no label"; with `guidance.Distilled`, a
      guidance-distilled student `eps_fn(x_t, t, y, w)`, w float32 (B,), which with a
      null_label is never called at w = 0: γ = 0 calls it at (∅, w = 1).
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
    guidance: a rule of `cfg_jax.guidance` (CFG, APG, CFGPlusPlus, Autoguidance,
      CFGZeroStar, IndependentCondition, Distilled), instead of `guidance_scale`; its scale
      may be a 1-D array of G scales too. ICG draws its labels from `num_classes`, and a
      model without a null label is guided by ICG, by CFG with a separate `uncond_eps_fn`,
      by autoguidance or by a classifier. Distilled runs one pass of a guidance-distilled
      student per step.
    null_label: the label id that means "unconditional" (num_classes for our models).
    num_classes: the number of classes the model knows, to refuse other labels (an embedding
      table looked up out of range gives NaN) and for ICG to draw from; None checks only
      against null_label.
    classifier_fn: `classifier_fn(x_t, t) -> logits` of a noisy classifier p_φ(y | x_t).
    classifier_scale: s, the classifier-guidance scale (a concrete 0 computes no gradient and
      compiles without the classifier; a traced one always computes it).
    learned_variance: `eps_fn` returns ε and the variance values v on its channel axis (2C
      channels, guided-diffusion's `learn_sigma`). DDPM then samples with the learned Σ
      (`ddpm.learned_log_variance`), taken from the conditional pass; DDIM and DPM-Solver++
      use ε alone.
    guided_channels: guide only the first k channels of ε, the rest keep the conditional ε
      (DiT's original `forward_with_cfg` guides 3 of 4 latent channels, diffusers'
      `DiTPipeline` all); None guides every channel.

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
    checks.check_scale_arg(guidance_scale)
    guidance = CFG(scale=1.0 if guidance_scale is None else guidance_scale)
  warning = checks.check_options(schedule, method=method, num_steps=num_steps, eta=eta,
                                 timestep_spacing=timestep_spacing,
                                 dynamic_threshold=dynamic_threshold)
  if isinstance(guidance, IndependentCondition) and guidance.num_classes is None:
    guidance = guidance.replace(num_classes=num_classes)
  checks.check_call(labels, image_shape, x_init, method, guidance, null_label, num_classes,
                    classifier_fn, classifier_scale)
  checks.check_zero_init(guidance, num_steps)
  if warning:  # allowed for the default spacing, but never silently
    warnings.warn(warning, UserWarning, stacklevel=2)
  if isinstance(guidance, Autoguidance):
    guidance = guidance.replace(weak_eps_fn=_as_partial(guidance.weak_eps_fn))
  if isinstance(guidance, CFG) and guidance.uncond_eps_fn is not None:
    guidance = guidance.replace(uncond_eps_fn=_as_partial(guidance.uncond_eps_fn))
  passes = passes_needed(guidance, null_label)  # decided on the concrete values, before tracing
  if guided_channels is not None and passes == "uncond":
    passes = "both"  # the unguided channels still need ε_c
  # γ = 0 and γ = 1 run one pass of the same compiled program, on ∅ or on the labels.
  one_pass_labels = jnp.full_like(labels, null_label) if passes == "uncond" else labels
  passes = "one" if passes in ("cond", "uncond") else passes
  scale = concrete(classifier_scale)
  if scale is not None and scale.shape == () and scale == 0:
    classifier_fn = None  # s = 0 computes no gradient: a program without the classifier
  if image_shape is None:
    image_shape = x_init.shape[1:]
  checks.check_guided_channels(guided_channels, tuple(image_shape), guidance)
  samples = loop.sample_loop_jit(
      key,
      _as_partial(eps_fn),
      None if classifier_fn is None else _as_partial(classifier_fn),
      schedule,
      labels.astype(jnp.int32),
      one_pass_labels.astype(jnp.int32),
      None if x_init is None else jnp.asarray(x_init, jnp.float32),
      as_float32(guidance),
      jnp.asarray(classifier_scale, jnp.float32),
      jnp.asarray(eta, jnp.float32),
      None if dynamic_threshold is None else jnp.asarray(dynamic_threshold, jnp.float32),
      image_shape=tuple(int(d) for d in image_shape),
      method=method,
      num_steps=num_steps,
      spacing=timestep_spacing or "leading",
      clip_denoised=bool(clip_denoised),
      null_label=None if null_label is None else int(null_label),
      passes=passes,
      learned_variance=bool(learned_variance),
      guided_channels=None if guided_channels is None else int(guided_channels),
  )
  checks.check_finite(samples, len(image_shape))
  return samples


def _as_partial(fn):
  # A Partial is a pytree whose treedef holds the function: jit traces its bound arrays
  # (e.g. model parameters) and caches on the function's identity.
  return fn if isinstance(fn, Partial) else Partial(fn)
