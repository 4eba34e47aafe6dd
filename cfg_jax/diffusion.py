"""Forward noising q(x_t | x_0), x0/ε conversions and the classifier-free training loss.

All functions are pure and jittable. `t` always indexes the full schedule (0..T-1).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import jax
import jax.numpy as jnp

from cfg_jax.schedules import Schedule

# eps_apply(params, x_t, t, y) -> ε̂, the network as a pure function of its parameters.
EpsApply = Callable[[Any, jnp.ndarray, jnp.ndarray, jnp.ndarray], jnp.ndarray]


def per_example(values: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Reshapes per-example values of shape (B,) to broadcast against x of shape (B, ...).

  The one broadcast helper of the library: samplers and guidance rules use it too."""
  return values.reshape(values.shape + (1,) * (x.ndim - values.ndim))


def signal_and_noise_scales(schedule: Schedule, t, x):
  """(sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) shaped to broadcast against x (`Schedule.scales`)."""
  signal, noise = schedule.scales(t)
  return per_example(signal, x), per_example(noise, x)


def q_sample(schedule: Schedule, x0, t, noise):
  """x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·ε."""
  signal, noise_std = signal_and_noise_scales(schedule, t, x0)
  return signal * x0 + noise_std * noise


def predict_x0_from_eps(schedule: Schedule, x_t, t, eps):
  """x0 = (x_t − sqrt(1 − ᾱ_t)·ε) / sqrt(ᾱ_t)."""
  signal, noise_std = signal_and_noise_scales(schedule, t, x_t)
  return (x_t - noise_std * eps) / signal


def predict_eps_from_x0(schedule: Schedule, x_t, t, x0):
  """ε = (x_t − sqrt(ᾱ_t)·x0) / sqrt(1 − ᾱ_t)."""
  signal, noise_std = signal_and_noise_scales(schedule, t, x_t)
  return (x_t - signal * x0) / noise_std


def drop_labels(key, labels, p_uncond, null_label):
  """Replaces each label by `null_label` with probability `p_uncond` (conditioning dropout)."""
  drop = jax.random.bernoulli(key, p_uncond, labels.shape)
  return jnp.where(drop, null_label, labels), drop


def min_snr_weight(schedule: Schedule, t, gamma: float):
  """min(SNR_t, γ)/SNR_t, SNR_t = ᾱ_t/(1 − ᾱ_t): the min-SNR-γ weight of an ε-MSE at t
  (Hang et al. 2023, for ε-prediction)."""
  signal, noise_std = schedule.scales(t)
  snr = jnp.square(signal / noise_std)
  return jnp.minimum(snr, gamma) / snr


def cfg_loss(
    params,
    eps_apply: EpsApply,
    schedule: Schedule,
    x0,
    labels,
    key,
    *,
    p_uncond: float,
    null_label: int,
    min_snr_gamma: Optional[float] = None,
):
  """Algorithm 1 of Ho & Salimans (2021): the ε-MSE with conditioning dropout.

  Draws t ~ U{0..T-1}, ε ~ N(0, I) and the label drop from `key`, so one network
  learns both ε(x_t, t, y) and ε(x_t, t, ∅). `min_snr_gamma=γ` weights each example's
  ε-MSE by min(SNR_t, γ)/SNR_t, SNR_t = ᾱ_t/(1 − ᾱ_t) (Hang et al. 2023, "Efficient
  diffusion training via min-SNR weighting", eq. for ε-prediction): the low-noise steps,
  whose ε is nearly unlearnable and whose gradients conflict with the rest, count less.

  Returns:
    (loss, aux): the mean squared ε error, and a dict with the per-example loss,
    the timesteps and the dropped-label mask, for logging.
  """
  t_key, noise_key, drop_key = jax.random.split(key, 3)
  batch = x0.shape[0]
  t = jax.random.randint(t_key, (batch,), 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  y, dropped = drop_labels(drop_key, labels, p_uncond, null_label)
  x_t = q_sample(schedule, x0, t, noise)
  eps = eps_apply(params, x_t, t, y)
  chex.assert_equal_shape([eps, noise])  # a wrong shape would broadcast silently
  loss_per_example = jnp.mean(jnp.square(eps - noise).reshape(batch, -1), axis=-1)
  if min_snr_gamma is not None:
    loss_per_example = loss_per_example * min_snr_weight(schedule, t, min_snr_gamma)
  aux = {"per_example_loss": loss_per_example, "t": t, "dropped": dropped}
  return jnp.mean(loss_per_example), aux
