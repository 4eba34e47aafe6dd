"""The guided ε̂ of one sampler step: which ε passes run, how a rule combines them, and the
classifier's gradient with its score shift (Dhariwal & Nichol 2021)."""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from cfg_jax import guidance
from cfg_jax.diffusion import per_example

EpsFn = Callable[[jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t, t, y) -> ε
ClassifierFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]  # (x_t, t) -> logits


def guided_eps(rule, passes, eps_fn, ctx: guidance.StepContext, labels, null_label, state,
               learned_variance=False):
  """(ε̂, ε̂_renoise, state, v) of the rule, from both passes ("both") or the main and the weak
  model ("main+weak"); v, the learned-variance values, come from the conditional (main) pass."""
  x_t, t = ctx.x_t, ctx.t
  if passes not in ("both", "main+weak"):
    raise ValueError(f"guided_eps runs 'both' or 'main+weak' passes, not {passes!r}.")
  if passes == "main+weak":  # autoguidance: two models, both conditional
    main, values = model_output(eps_fn, x_t, t, labels, learned_variance)
    weak, _ = model_output(rule.weak_eps_fn, x_t, t, labels)  # ε alone, whatever the model
    return (*rule.combine(ctx, main, weak, state), values)
  eps_cond, eps_uncond, values = both_passes(eps_fn, x_t, t, labels, null_label,
                                             learned_variance)
  return (*rule.combine(ctx, eps_cond, eps_uncond, state), values)


def model_output(eps_fn, x_t, t, y, learned_variance=False):
  """(ε, v) of `eps_fn(x_t, t, y)`: with learned variance the model returns ε and the
  variance values v on its channel axis (guided-diffusion's and DiT's layout), else ε alone
  and v is None. The shape is checked: a wrong one would broadcast silently."""
  out = eps_fn(x_t, t, y)
  if not learned_variance:
    chex.assert_equal_shape([out, x_t])
    return out, None
  chex.assert_shape(out, (*x_t.shape[:-1], 2 * x_t.shape[-1]))
  eps, values = jnp.split(out, 2, axis=-1)
  return eps, values


def both_passes(eps_fn, x_t, t, y, null_label, learned_variance=False):
  """(ε_c, ε_u, v_c) from one batched 2B call, as maxdiffusion does."""
  eps, values = model_output(eps_fn, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                             jnp.concatenate([y, jnp.full_like(y, null_label)]),
                             learned_variance)
  eps_cond, eps_uncond = jnp.split(eps, 2)
  return eps_cond, eps_uncond, None if values is None else jnp.split(values, 2)[0]


def uses_null_label(rule) -> bool:
  """Whether sampling with `rule` reads ε(x, t, ∅): all but autoguidance and a concrete plain
  γ = 1 (which runs the conditional pass alone)."""
  return passes_needed(rule, null_label=0) not in ("cond", "main+weak")


def passes_needed(rule, null_label) -> str:
  """Which ε passes a step runs: "cond", "uncond", "both" (one 2B call) or "main+weak".

  `sample` runs "cond" and "uncond" as one program ("one" pass, on the labels or on ∅).

  Decided on concrete values only, so a traced or swept scale always runs both passes and
  each case compiles once, never once per value.
  """
  if isinstance(rule, guidance.Autoguidance):
    return "main+weak"
  if not isinstance(rule, guidance.CFG):
    return "both"
  if null_label is None:
    return "cond"
  scale, rescale = concrete(rule.scale), concrete(rule.rescale)
  if scale is not None and scale.shape == ():
    if scale == 1 and rule.weight_schedule == "constant":
      return "cond"  # γ_t = 1 inside the interval and out: ε̂ = ε_c, rescaled or not
    if scale == 0 and rule.interval is None and rescale is not None and rescale == 0:
      return "uncond"  # γ_t = 0 everywhere: ε̂ = ε_u
  return "both"


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


def score_shift(schedule, t, grad):
  """sqrt(1 − ᾱ_t)·g, what classifier guidance takes off ε: ε̂ = ε − sqrt(1 − ᾱ_t)·g.

  Dhariwal & Nichol's Algorithm 2 (guided-diffusion's `condition_score`): since
  ∇_{x_t} log p(x_t) = −ε/sqrt(1 − ᾱ_t), adding g = s·∇_{x_t} log p_φ(y | x_t) to the score
  shifts ε by −sqrt(1 − ᾱ_t)·g. DDIM and DPM-Solver++ step with the shifted ε̂.
  """
  _, noise_std = schedule.scales(t)  # sqrt(1 − ᾱ_t), the float64-derived table
  return per_example(noise_std, grad) * grad


def concrete(value):
  """The value as a NumPy array, or None while it is being traced."""
  try:
    return np.asarray(value)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
