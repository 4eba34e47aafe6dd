"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: fast solver for guided sampling of
diffusion probabilistic models"), the multistep second-order data-prediction solver."""

from __future__ import annotations

import jax.numpy as jnp

from cfg_jax import diffusion
from cfg_jax.diffusion import per_example
from cfg_jax.sampling.clipping import denoise_x0
from cfg_jax.sampling.guided import score_shift


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
  lam = half_log_snr(signal, noise_std)  # λ_t = log(α_t/σ_t)
  lam_prev = half_log_snr(jnp.where(final, 1.0, signal_prev), jnp.where(final, 1.0, noise_std_prev))
  lam_last = half_log_snr(jnp.where(first, 1.0, signal_last), jnp.where(first, 1.0, noise_std_last))
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


def half_log_snr(signal, noise_std):
  """λ = log(sqrt(ᾱ)/sqrt(1 − ᾱ)), DPM-Solver's half log-SNR, from the tables' α and σ."""
  return jnp.log(signal) - jnp.log(noise_std)
