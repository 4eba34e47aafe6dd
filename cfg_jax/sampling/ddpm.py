"""Ancestral DDPM sampling (Ho et al. 2020) on the respaced chain, with classifier guidance as
Dhariwal & Nichol's Algorithm 1 mean shift."""

from __future__ import annotations

import jax.numpy as jnp

from cfg_jax import diffusion
from cfg_jax.diffusion import per_example
from cfg_jax.sampling.clipping import denoise_x0
from cfg_jax.sampling.respacing import respaced_beta


def posterior_variance(schedule, t, t_prev):
  """β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t of the respaced chain, Ho et al. eq. (7)."""
  _, noise_std = schedule.scales(t)
  _, noise_std_prev = schedule.scales(t_prev)
  return respaced_beta(schedule, t, t_prev) * (noise_std_prev / noise_std) ** 2


def learned_log_variance(schedule, t, t_prev, t_last, model_var_values):
  """guided-diffusion's learned range (Nichol & Dhariwal 2021, eq. (15)):
  log Σ = v′·log β_t + (1 − v′)·log β̃_t with v′ = (v + 1)/2, per pixel.

  log β̃ is clipped at the chain's last step, where β̃ = 0, to the β̃ of the step before it
  (from t_last to t), as guided-diffusion's `posterior_log_variance_clipped` is.
  """
  final = t_prev < 0
  small = jnp.where(final, posterior_variance(schedule, t_last, t),
                    posterior_variance(schedule, t, t_prev))
  min_log = jnp.log(jnp.maximum(small, jnp.finfo(jnp.float32).tiny))
  max_log = jnp.log(respaced_beta(schedule, t, t_prev))
  frac = (model_var_values + 1.0) / 2.0
  return frac * per_example(max_log, frac) + (1.0 - frac) * per_example(min_log, frac)


def ddpm_step(schedule, x_t, t, t_prev, eps, grad, noise, clip_denoised, dynamic_threshold=None,
              model_var_values=None, t_last=None):
  """One ancestral step from t to t_prev on the respaced chain, with Algorithm 1's mean shift.

  Samples the posterior q(x_{t−1} | x_t, x̂0) of Ho et al. eqs. (6)-(7), with the fixed
  ("small") variance β̃_t, or the learned one of `model_var_values` (the model's second
  half of channels, in [−1, 1]; `t_last` is the timestep visited before t).
  """
  signal, noise_std = schedule.scales(t)  # sqrt(ᾱ_t), sqrt(1 − ᾱ_t)
  signal_prev, noise_std_prev = schedule.scales(t_prev)  # the same at t − 1
  beta = respaced_beta(schedule, t, t_prev)  # β_t = 1 − α_t, α_t = ᾱ_t/ᾱ_{t−1}
  noise_ratio_sq = (noise_std_prev / noise_std) ** 2  # (1 − ᾱ_{t−1})/(1 − ᾱ_t)
  x0 = diffusion.predict_x0_from_eps(schedule, x_t, t, eps)  # Ho et al. eq. (15) solved for x0
  x0 = denoise_x0(x0, clip_denoised, dynamic_threshold)
  # μ̃_t = sqrt(ᾱ_{t−1})β_t/(1 − ᾱ_t)·x0 + sqrt(α_t)(1 − ᾱ_{t−1})/(1 − ᾱ_t)·x_t, eq. (7).
  coef_x0 = signal_prev * beta / noise_std**2
  coef_xt = (signal / signal_prev) * noise_ratio_sq
  mean = per_example(coef_x0, x_t) * x0 + per_example(coef_xt, x_t) * x_t
  if model_var_values is None:
    # β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t)·β_t, eq. (7); 0 at the last step (ᾱ_{t−1} = 1).
    variance = per_example(beta * noise_ratio_sq, x_t)
    std = jnp.sqrt(variance)
  else:
    log_variance = learned_log_variance(schedule, t, t_prev, t_last, model_var_values)
    variance = jnp.exp(log_variance)
    # No noise on the last step, as guided-diffusion's `nonzero_mask`.
    std = jnp.where(per_example(t_prev < 0, x_t), 0.0, jnp.exp(0.5 * log_variance))
  if grad is not None:
    # Dhariwal & Nichol Algorithm 1: μ + s·Σ·∇log p_φ(y | x_t).
    mean = mean + variance * grad
  # x_{t−1} ~ N(μ̃_t, Σ), eq. (6).
  return mean + std * noise
