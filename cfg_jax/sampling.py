"""Guided DDIM and DDPM sampling as one compiled `lax.scan`.

Conventions (kept identical to diffusers and guided-diffusion so trajectories agree):

* Timesteps are spaced "leading": t_i = i·(T // num_steps), visited from the largest down to
  0; the step from t goes to t_prev = t − T // num_steps and ᾱ_prev = 1 below t = 0
  (diffusers' `set_alpha_to_one`, guided-diffusion's `alphas_cumprod_prev`).
* DDPM on a respaced grid uses β'_t = 1 − ᾱ_t / ᾱ_prev (guided-diffusion's `respace.py`) and
  the posterior ("fixed small") variance Σ = β'_t (1 − ᾱ_prev) / (1 − ᾱ_t).
* `clip_denoised` clips the predicted x0 to [−1, 1]; DDIM then re-derives ε from the clipped
  x0, as guided-diffusion (and GLIDE) do.
* Classifier-free guidance: ε̂ = ε(x,t,∅) + γ·(ε(x,t,y) − ε(x,t,∅)). γ = 0 is unconditional,
  γ = 1 conditional; Ho & Salimans' w equals γ − 1. Both passes are one batched call.
* Classifier guidance with g = s·∇_{x_t} log p_φ(y | x_t), taken at x_t: DDIM shifts the
  score, ε̂ ← ε̂ − sqrt(1 − ᾱ_t)·g (guided-diffusion's `condition_score`); DDPM shifts the
  mean, μ ← μ + Σ·g (`condition_mean`).

Guidance scales, labels, η, the key and x_T are traced: a new value never recompiles. The
structure (ε-function, method, number of steps, clipping, shapes) is static. Pass the same
ε-function object each call (or a `jax.tree_util.Partial` over its parameters) to reuse
the compiled sampler.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from cfg_jax import diffusion
from cfg_jax.schedules import Schedule

EpsFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t, t, y) -> ε
ClassifierFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t, t) -> logits

METHODS = ("ddim", "ddpm")


def timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The visited timesteps, largest first: i·(T // num_steps) for i = num_steps−1..0."""
  stride = num_timesteps // num_steps
  return np.arange(num_steps - 1, -1, -1, dtype=np.int32) * stride


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
    guidance_scale=1.0,
    null_label: Optional[int] = None,
    classifier_fn: Optional[ClassifierFn] = None,
    classifier_scale=0.0,
):
  """Draws x_0 of shape (B, *image_shape) for the B given labels.

  Args:
    key: PRNG key; draws x_T (unless `x_init` is given) and the sampler's noise.
    eps_fn: `eps_fn(x_t, t, y) -> ε`, t int32 (B,) timesteps of the full schedule, y int32
      (B,) labels where `y == null_label` means "no label".
    schedule: the noise schedule the model was trained with.
    labels: int (B,) class labels, each in 0..null_label.
    image_shape: shape of one sample, e.g. (8, 8, 1); or give `x_init`.
    x_init: the starting x_T, shape (B, *image_shape).
    method: "ddim" or "ddpm" (ancestral, posterior variance).
    num_steps: number of denoising steps, 1..T.
    eta: DDIM's η (0 is deterministic). Must be 0 for DDPM.
    clip_denoised: clip the predicted x0 to [−1, 1] at every step.
    guidance_scale: γ of classifier-free guidance; needs `null_label` unless it is 1.
    null_label: the label id that means "unconditional" (num_classes for our models).
    classifier_fn: `classifier_fn(x_t, t) -> logits` of a noisy classifier p_φ(y | x_t).
    classifier_scale: s, the classifier-guidance scale (0 computes no gradient).
  """
  labels = jnp.asarray(labels)
  _validate(schedule, labels, image_shape, x_init, method, num_steps, eta, guidance_scale,
            null_label, classifier_fn, classifier_scale)
  if image_shape is None:
    image_shape = x_init.shape[1:]
  return _sample_jit(
      key,
      _as_partial(eps_fn),
      None if classifier_fn is None else _as_partial(classifier_fn),
      schedule,
      labels.astype(jnp.int32),
      None if x_init is None else jnp.asarray(x_init, jnp.float32),
      jnp.asarray(guidance_scale, jnp.float32),
      jnp.asarray(classifier_scale, jnp.float32),
      jnp.asarray(eta, jnp.float32),
      image_shape=tuple(int(d) for d in image_shape),
      method=method,
      num_steps=num_steps,
      clip_denoised=bool(clip_denoised),
      null_label=None if null_label is None else int(null_label),
  )


def classifier_free_eps(eps_fn: EpsFn, x_t, t, y, guidance_scale, null_label):
  """ε̂ = ε(x,t,∅) + γ·(ε(x,t,y) − ε(x,t,∅)), with both passes in one batched call."""
  if null_label is None:
    eps = eps_fn(x_t, t, y)
    chex.assert_equal_shape([eps, x_t])
    return eps
  both = eps_fn(
      jnp.concatenate([x_t, x_t]),
      jnp.concatenate([t, t]),
      jnp.concatenate([y, jnp.full_like(y, null_label)]),
  )
  chex.assert_shape(both, (2 * x_t.shape[0], *x_t.shape[1:]))
  eps_cond, eps_uncond = jnp.split(both, 2)
  return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def classifier_gradient(classifier_fn: ClassifierFn, x_t, t, y, scale):
  """g = s·∇_{x_t} log softmax(classifier_fn(x_t, t))[y], skipped (zeros) when s == 0.

  A label outside the classifier's classes (the null label) gets no guidance.
  """

  def total_log_prob(x):
    logits = classifier_fn(x, t)
    chex.assert_rank(logits, 2)  # (B, num_classes)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    num_classes = log_probs.shape[-1]
    picked = jnp.take_along_axis(log_probs, jnp.minimum(y, num_classes - 1)[:, None], axis=-1)
    return jnp.sum(jnp.where(y[:, None] < num_classes, picked, 0.0))

  # Examples are independent, so the gradient of the summed log-probability is per-example.
  return jax.lax.cond(
      scale != 0,
      lambda x: scale * jax.grad(total_log_prob)(x),
      jnp.zeros_like,
      x_t,
  )


def ddim_step(schedule, x_t, t, t_prev, eps, grad, eta, noise, clip_denoised):
  """One DDIM step from t to t_prev, with the classifier score shift of Algorithm 2."""
  abar = schedule.alphas_cumprod[t]
  abar_prev = _abar_prev(schedule, t_prev)
  x0 = diffusion.predict_x0_from_eps(schedule, x_t, t, eps)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
    eps = diffusion.predict_eps_from_x0(schedule, x_t, t, x0)
  if grad is not None:
    eps = eps - _bcast(jnp.sqrt(1.0 - abar), x_t) * grad
    x0 = diffusion.predict_x0_from_eps(schedule, x_t, t, eps)
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar)) * jnp.sqrt(1.0 - abar / abar_prev)
  direction = jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma**2, 0.0))
  return (_bcast(jnp.sqrt(abar_prev), x_t) * x0 + _bcast(direction, x_t) * eps
          + _bcast(sigma, x_t) * noise)


def ddpm_step(schedule, x_t, t, t_prev, eps, grad, noise, clip_denoised):
  """One ancestral step from t to t_prev on the respaced chain, with the mean shift Σ·g."""
  abar = schedule.alphas_cumprod[t]
  abar_prev = _abar_prev(schedule, t_prev)
  alpha = abar / abar_prev
  beta = 1.0 - alpha
  x0 = diffusion.predict_x0_from_eps(schedule, x_t, t, eps)
  if clip_denoised:
    x0 = jnp.clip(x0, -1.0, 1.0)
  coef_x0 = jnp.sqrt(abar_prev) * beta / (1.0 - abar)
  coef_xt = jnp.sqrt(alpha) * (1.0 - abar_prev) / (1.0 - abar)
  variance = beta * (1.0 - abar_prev) / (1.0 - abar)
  mean = _bcast(coef_x0, x_t) * x0 + _bcast(coef_xt, x_t) * x_t
  if grad is not None:
    mean = mean + _bcast(variance, x_t) * grad
  # Σ = 0 at the last step (ᾱ_prev = 1), so no noise is added there.
  return mean + _bcast(jnp.sqrt(variance), x_t) * noise


@functools.partial(
    jax.jit,
    static_argnames=("image_shape", "method", "num_steps", "clip_denoised", "null_label"),
)
def _sample_jit(key, eps_fn, classifier_fn, schedule, labels, x_init, guidance_scale,
                classifier_scale, eta, *, image_shape, method, num_steps, clip_denoised,
                null_label):
  init_key, loop_key = jax.random.split(key)
  batch = labels.shape[0]
  if x_init is None:
    x_init = jax.random.normal(init_key, (batch, *image_shape), jnp.float32)
  ts = timesteps(schedule.num_timesteps, num_steps)
  stride = schedule.num_timesteps // num_steps

  def step(x_t, t):
    t_batch = jnp.full((batch,), t, jnp.int32)
    eps = classifier_free_eps(eps_fn, x_t, t_batch, labels, guidance_scale, null_label)
    grad = None
    if classifier_fn is not None:
      grad = classifier_gradient(classifier_fn, x_t, t_batch, labels, classifier_scale)
    noise = jax.random.normal(jax.random.fold_in(loop_key, t), x_t.shape, x_t.dtype)
    if method == "ddim":
      x_prev = ddim_step(schedule, x_t, t_batch, t_batch - stride, eps, grad, eta, noise,
                         clip_denoised)
    else:
      x_prev = ddpm_step(schedule, x_t, t_batch, t_batch - stride, eps, grad, noise,
                         clip_denoised)
    return x_prev, None

  x_0, _ = jax.lax.scan(step, x_init, jnp.asarray(ts))
  return x_0


def _abar_prev(schedule, t_prev):
  return jnp.where(t_prev >= 0, schedule.alphas_cumprod[jnp.maximum(t_prev, 0)], 1.0)


def _bcast(values, x):
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


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


def _validate(schedule, labels, image_shape, x_init, method, num_steps, eta, guidance_scale,
              null_label, classifier_fn, classifier_scale):
  if method not in METHODS:
    raise ValueError(f"Unknown sampling method {method!r}; use one of {METHODS}.")
  num_timesteps = schedule.num_timesteps
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be an int in 1..{num_timesteps}, got {num_steps!r}.")
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}.")
  if null_label is not None and (not isinstance(null_label, (int, np.integer)) or null_label < 0):
    raise ValueError(f"null_label must be a non-negative int or None, got {null_label!r}.")
  concrete_labels = _concrete(labels)
  if concrete_labels is not None and concrete_labels.size:
    high = null_label if null_label is not None else math.inf
    bad = concrete_labels[(concrete_labels < 0) | (concrete_labels > high)]
    if bad.size:
      limit = f"0..{null_label} (null_label)" if null_label is not None else "non-negative"
      raise ValueError(f"label {int(bad[0])} is out of range; labels must be {limit}.")
  if x_init is None and image_shape is None:
    raise ValueError("Give image_shape (the shape of one sample) or x_init (x_T).")
  if x_init is not None:
    x_shape = tuple(np.shape(x_init))
    if not x_shape or x_shape[0] != labels.shape[0]:
      raise ValueError(f"x_init has shape {x_shape}; its leading axis must equal the "
                       f"number of labels ({labels.shape[0]}).")
    if image_shape is not None and tuple(image_shape) != x_shape[1:]:
      raise ValueError(f"x_init shape {x_shape} does not match image_shape {tuple(image_shape)}.")
  for name, value in (("guidance_scale", guidance_scale), ("classifier_scale", classifier_scale),
                      ("eta", eta)):
    concrete = _concrete(value)
    if concrete is not None and (concrete.shape != () or not np.isfinite(concrete)):
      raise ValueError(f"{name} must be a finite scalar, got {value!r}.")
  eta_value = _concrete(eta)
  if eta_value is not None and eta_value < 0:
    raise ValueError(f"eta must be >= 0, got {float(eta_value)}.")
  if method == "ddpm" and eta_value is not None and eta_value != 0:
    raise ValueError("eta applies to method='ddim' only; DDPM's noise is fixed by its variance.")
  scale = _concrete(guidance_scale)
  if null_label is None and scale is not None and scale != 1:
    raise ValueError(f"guidance_scale={float(scale)} needs null_label (the label id the "
                     "model was trained with for 'no label').")
  cls_scale = _concrete(classifier_scale)
  if classifier_fn is None and cls_scale is not None and cls_scale != 0:
    raise ValueError("classifier_scale is non-zero but no classifier_fn was given.")
