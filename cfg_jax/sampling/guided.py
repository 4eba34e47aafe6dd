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
               learned_variance=False, guided_channels=None, rule_key=None):
  """(ε̂, ε̂_renoise, state, v) of the rule, from one batched call of the model at the labels
  and at the guiding labels ("both": ∅, or ICG's ŷ drawn from `rule_key`), from two models
  ("two_models": autoguidance's main and weak, or CFG's model and its separate unconditional
  network) or from one call of a guidance-distilled student at the rule's w ("distilled");
  v, the learned-variance values, come from the conditional (main) pass.

  `guided_channels=k` guides only the first k channels of ε; the rest keep the conditional
  ε (DiT's original `forward_with_cfg` guides 3 of its 4 latent channels). None guides all.
  """
  x_t, t = ctx.x_t, ctx.t
  if passes not in ("both", "two_models", "distilled"):
    raise ValueError(f"guided_eps runs 'both', 'two_models' or 'distilled' passes, not "
                     f"{passes!r}.")
  if passes == "distilled":  # the student computes ε̂ itself: nothing to combine
    eps, values = model_output(distilled_eps_fn(rule, eps_fn, null_label), x_t, t, labels,
                               learned_variance)
    return eps, eps, state, values
  if passes == "two_models":  # both on the labels: an unconditional network ignores them
    eps_cond, values = model_output(eps_fn, x_t, t, labels, learned_variance)
    other, _ = model_output(second_eps_fn(rule), x_t, t, labels)  # ε alone, whatever the model
  else:
    eps_cond, other, values = both_passes(eps_fn, x_t, t, labels,
                                          guiding_labels(rule, labels, null_label, rule_key),
                                          learned_variance)
  eps, eps_renoise, state = rule.combine(ctx, eps_cond, other, state)
  if guided_channels is not None:
    eps, eps_renoise = (keep_unguided_channels(e, eps_cond, guided_channels)
                        for e in (eps, eps_renoise))
  return eps, eps_renoise, state, values


def second_eps_fn(rule):
  """The ε-function of a "two_models" rule's other model: autoguidance's weak one, or CFG's
  separate unconditional network."""
  return rule.weak_eps_fn if isinstance(rule, guidance.Autoguidance) else rule.uncond_eps_fn


def distilled_eps_fn(rule: guidance.Distilled, eps_fn, null_label=None):
  """The student `eps_fn(x_t, t, y, w)` as an ε-function of (x_t, t, y), at the rule's w for
  every example (a scalar: one scale of a sweep is vmapped at a time).

  w = 0 is the unconditional model, as for two-pass CFG: the student at ∅ (and w = 1), whose
  target is ε_u at every w it learned, since its dropped labels have ε_c = ε_u. So a student
  of Meng et al.'s range, γ in [1, 5], still has γ = 0.
  """

  def eps(x_t, t, y):
    w = jnp.full(y.shape, rule.scale, jnp.float32)
    if null_label is None:
      return eps_fn(x_t, t, y, w)
    unconditional = w == 0
    return eps_fn(x_t, t, jnp.where(unconditional, null_label, y),
                  jnp.where(unconditional, 1.0, w))

  return eps


def guiding_labels(rule, labels, null_label, rule_key):
  """The labels of the pass a "both" rule guides away from: ICG's ŷ, else ∅."""
  if isinstance(rule, guidance.IndependentCondition):
    return rule.guide_labels(rule_key, labels, null_label)
  return jnp.full_like(labels, null_label)


def keep_unguided_channels(eps_guided, eps_cond, guided_channels: int):
  """ε̂ on the first `guided_channels` channels, ε_c on the rest."""
  return jnp.concatenate([eps_guided[..., :guided_channels],
                          eps_cond[..., guided_channels:]], axis=-1)


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


def both_passes(eps_fn, x_t, t, y, y_guide, learned_variance=False):
  """(ε_c, ε at the guiding labels y_guide, v_c) from one batched 2B call, as maxdiffusion
  does."""
  eps, values = model_output(eps_fn, jnp.concatenate([x_t, x_t]), jnp.concatenate([t, t]),
                             jnp.concatenate([y, y_guide]), learned_variance)
  eps_cond, eps_guide = jnp.split(eps, 2)
  return eps_cond, eps_guide, None if values is None else jnp.split(values, 2)[0]


def passes_needed(rule, null_label) -> str:
  """Which ε passes a step runs: "cond", "uncond", "both" (one 2B call, at the labels and at
  ∅ or ICG's ŷ), "two_models" (autoguidance; CFG with a separate unconditional network) or
  "distilled" (one call of a guidance-distilled student, at the labels and w).

  `sample` runs "cond" and "uncond" as one program ("one" pass, on the labels or on ∅).

  Decided on concrete values only, so a traced or swept scale always runs both passes and
  each case compiles once, never once per value.
  """
  if isinstance(rule, guidance.Autoguidance):
    return "two_models"
  if isinstance(rule, guidance.Distilled):
    return "distilled"
  if not isinstance(rule, guidance.CFG):
    return "both"
  separate = rule.uncond_eps_fn is not None
  if null_label is None and not separate:
    return "cond"
  scale, rescale = concrete(rule.scale), concrete(rule.rescale)
  if scale is not None and scale.shape == ():
    if scale == 1 and rule.weight_schedule == "constant":
      return "cond"  # γ_t = 1 inside the interval and out: ε̂ = ε_c, rescaled or not
    if (scale == 0 and rule.interval is None and rescale is not None and rescale == 0
        and not separate):
      return "uncond"  # γ_t = 0 everywhere: ε̂ = ε(x, t, ∅)
  return "two_models" if separate else "both"


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
