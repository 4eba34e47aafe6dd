"""Keeping the predicted x0 in the data range: clipping and dynamic thresholding."""

from __future__ import annotations

import jax.numpy as jnp

from cfg_jax.diffusion import per_example


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
