"""DDIM (Song et al. 2021, "Denoising diffusion implicit models"), with classifier guidance
as Dhariwal & Nichol's Algorithm 2 score shift."""

from __future__ import annotations

import jax.numpy as jnp

from cfg_jax import diffusion
from cfg_jax.diffusion import per_example
from cfg_jax.sampling.clipping import denoise_x0
from cfg_jax.sampling.guided import score_shift
from cfg_jax.sampling.respacing import respaced_beta


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
  beta = respaced_beta(schedule, t, t_prev)  # β_t = 1 − ᾱ_t/ᾱ_{t−1}
  # σ_t(η) = η·sqrt((1 − ᾱ_{t−1})/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_{t−1}), Song et al. eq. (16).
  step_noise_std = eta * (noise_std_prev / noise_std) * jnp.sqrt(beta)
  # sqrt(1 − ᾱ_{t−1} − σ_t²), the "direction pointing to x_t" of eq. (12), written as
  # sqrt(1 − ᾱ_{t−1})·sqrt(1 − η²β_t/(1 − ᾱ_t)): the table value itself at η = 0.
  direction = noise_std_prev * jnp.sqrt(jnp.maximum(1.0 - eta**2 * beta / noise_std**2, 0.0))
  # x_{t−1} = sqrt(ᾱ_{t−1})·x̂0 + sqrt(1 − ᾱ_{t−1} − σ_t²)·ε + σ_t·z, eq. (12).
  return (per_example(signal_prev, x_t) * x0 + per_example(direction, x_t) * eps_renoise
          + per_example(step_noise_std, x_t) * noise)
