"""Every check of the sampler's arguments, each made once, before anything is traced.

`check_options` is public so a caller can fail before slow work that comes first (a sweep
trains its evaluation network before it samples); `sampling.sample` runs all of them.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from cfg_jax import errors, guidance
from cfg_jax.sampling.guided import concrete
from cfg_jax.sampling.respacing import SPACINGS, timesteps

METHODS = ("ddim", "ddpm", "dpmpp_2m")
# x_T ~ N(0, I) is a sample of x_t only where ᾱ_t ≈ 0; a grid may start at most this far off.
MAX_START_ALPHA_CUMPROD = 1e-2


def check_options(schedule, *, method: str = "ddim", num_steps: int = 50, eta=0.0,
                  timestep_spacing: Optional[str] = None, dynamic_threshold=None) -> Optional[str]:
  """Raises an InputError for sampler options that cannot work with `schedule`.

  Returns a warning (or None): a default "leading" grid that starts far from pure noise is
  allowed, with this message; asked for explicitly it raises.
  """
  spacing = timestep_spacing
  if method not in METHODS:
    raise errors.InputError(f"Unknown sampling method {method!r}; use one of {METHODS}.")
  num_timesteps = schedule.num_timesteps
  if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_timesteps:
    raise errors.InputError(f"num_steps must be an int in 1..{num_timesteps}, got {num_steps!r}.")
  warning = _check_spacing(schedule, method, num_steps, spacing)
  eta_value = concrete(eta)
  if eta_value is not None and (eta_value.shape != () or not np.isfinite(eta_value)):
    raise errors.InputError(f"eta must be a finite scalar, got {eta!r}.")
  if eta_value is not None and eta_value < 0:
    raise errors.InputError(f"eta must be >= 0, got {float(eta_value)}.")
  if method != "ddim" and eta_value is not None and eta_value != 0:
    raise errors.InputError(f"eta applies to method='ddim' only; {method} has no η.")
  if dynamic_threshold is not None:
    p = concrete(dynamic_threshold)
    if p is not None and (p.shape != () or not 0 < p <= 1):
      raise errors.InputError(f"dynamic_threshold must be a percentile in (0, 1] or None, got "
                              f"{dynamic_threshold!r}.")
  return warning


def _check_spacing(schedule, method, num_steps, spacing):
  """A warning or None; raises for a bad spacing asked for explicitly.

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
  table = concrete(schedule.alphas_cumprod)  # None for a traced schedule: nothing to check
  start = int(ts[0])
  if table is None or start == T - 1 or table[start] <= MAX_START_ALPHA_CUMPROD:
    return None
  message = (f"timestep_spacing={spacing!r} with num_steps={num_steps} starts at t={start} of "
             f"T={T}, where ᾱ={float(table[start]):.3g} > {MAX_START_ALPHA_CUMPROD:g}, so x_T ~ "
             f"N(0, I) is not pure noise there; use timestep_spacing='trailing' (or 'linspace'), "
             f"or more steps.")
  if explicit:
    raise errors.InputError(message)
  return message


def check_scale_arg(guidance_scale):
  """guidance_scale: None, a finite scalar or a 1-D array of finite scales."""
  value = None if guidance_scale is None else concrete(guidance_scale)
  if value is not None and (value.ndim > 1 or value.size == 0 or not np.all(np.isfinite(value))):
    shown = value.tolist() if value.ndim <= 1 and value.size <= 8 else value.shape
    raise errors.InputError(f"guidance_scale must be a finite scalar or a 1-D array of scales, got "
                            f"{shown}.")


def check_call(labels, image_shape, x_init, method, rule, null_label, num_classes, classifier_fn,
              classifier_scale):
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise errors.InputError(f"labels must be a 1-D integer array, got {labels.dtype} "
                            f"{labels.shape}.")
  for name, value in (("null_label", null_label), ("num_classes", num_classes)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value < 0):
      raise errors.InputError(f"{name} must be a non-negative int or None, got {value!r}.")
  check_labels(concrete(labels), null_label, num_classes)
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
  cls_scale = concrete(classifier_scale)
  if cls_scale is not None and (cls_scale.shape != () or not np.isfinite(cls_scale)):
    raise errors.InputError(f"classifier_scale must be a finite scalar, got "
                            f"{classifier_scale!r}.")
  _check_rule(rule, method, null_label, num_classes)
  if classifier_fn is None and cls_scale is not None and cls_scale != 0:
    raise errors.InputError("classifier_scale is non-zero but no classifier_fn was given.")


def check_guided_channels(guided_channels, image_shape, rule) -> None:
  channels = image_shape[-1]
  if guided_channels is not None and (
      not isinstance(guided_channels, (int, np.integer)) or not 0 < guided_channels <= channels):
    raise errors.InputError(f"guided_channels must be an int in 1..{channels} (the channels of "
                            f"a sample) or None (all), got {guided_channels!r}.")
  if guided_channels is not None and isinstance(rule, guidance.Distilled):
    raise errors.InputError("guided_channels does not apply to guidance.Distilled: a distilled "
                            "student guides every channel in its one pass.")


def check_labels(labels, null_label, num_classes):
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


def check_zero_init(rule, num_steps) -> None:
  """CFG-Zero*'s zero-init must leave at least one step that denoises."""
  steps = concrete(rule.zero_init_steps) if isinstance(rule, guidance.CFGZeroStar) else None
  if steps is not None and steps >= num_steps:
    raise errors.InputError(f"CFGZeroStar zero_init_steps={int(steps)} would hold x_T through "
                            f"all num_steps={num_steps} steps; use fewer zero-init steps.")


def _check_rule(rule, method, null_label, num_classes):
  if not isinstance(rule, guidance.RULES):
    names = ", ".join(r.__name__ for r in guidance.RULES)
    raise errors.InputError(f"guidance must be one of cfg_jax.guidance's {names}; got "
                     f"{type(rule).__name__}.")
  rule.validate()  # again: the rule may have been built from traced values
  name = type(rule).__name__
  if isinstance(rule, guidance.CFGPlusPlus) and method != "ddim":
    raise errors.InputError(f"CFGPlusPlus works with method='ddim' only, got method={method!r}.")
  if isinstance(rule, guidance.Autoguidance):
    if rule.weak_eps_fn is None:
      raise errors.InputError("Autoguidance needs weak_eps_fn, the weaker model's ε-function.")
    return
  if isinstance(rule, guidance.IndependentCondition):
    if rule.num_classes is None:
      raise errors.InputError("IndependentCondition needs num_classes, the classes its guiding "
                              "labels are drawn from; pass num_classes to sample.")
    if num_classes is not None and rule.num_classes != num_classes:
      raise errors.InputError(f"IndependentCondition num_classes={rule.num_classes} differs from "
                              f"the model's num_classes={num_classes}.")
    return
  if isinstance(rule, guidance.CFG) and rule.uncond_eps_fn is not None:
    return  # ε_u comes from the separate network
  if isinstance(rule, guidance.Distilled):
    return  # the student takes w: no unconditional pass
  if null_label is None:
    scale = concrete(rule.scale)
    plain = isinstance(rule, guidance.CFG) and rule.weight_schedule == "constant"
    if not plain or (scale is not None and np.any(scale != 1)):
      shown = f"guidance_scale={scale.tolist()}" if plain else name
      raise errors.InputError(f"{shown} needs null_label, the unconditional pass ε(x, t, ∅), "
                              "which this model does not have; use guidance_scale=1 (the "
                              "conditional model), guidance.IndependentCondition (sample.py "
                              "--guidance icg), a separate unconditional network "
                              "(guidance.CFG(uncond_eps_fn=...)), classifier guidance or "
                              "autoguidance.")


def check_finite(samples, image_ndim):
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
