"""Discrete noise schedules as pytrees.

A schedule is fully described by ᾱ_t (`alphas_cumprod`) for t = 0..T-1; every other
quantity (β_t, log-SNR, posterior coefficients) derives from it. The tables are
computed in float64 with NumPy and stored as float32, as guided-diffusion and
diffusers do, so sampler trajectories agree with those references.
"""

from __future__ import annotations

import math

import flax.struct
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Schedule:
  """ᾱ_t for t = 0..T-1 (float32, shape (T,)); a pytree, so it can be traced."""

  alphas_cumprod: jnp.ndarray

  @property
  def num_timesteps(self) -> int:
    return self.alphas_cumprod.shape[0]

  @property
  def betas(self) -> jnp.ndarray:
    prev = jnp.concatenate([jnp.ones((1,), self.alphas_cumprod.dtype), self.alphas_cumprod[:-1]])
    return 1.0 - self.alphas_cumprod / prev

  def log_snr(self, t=None) -> jnp.ndarray:
    """λ_t = log(ᾱ_t / (1 − ᾱ_t)), for all t or the given timesteps."""
    abar = self.alphas_cumprod if t is None else self.alphas_cumprod[t]
    return jnp.log(abar) - jnp.log1p(-abar)


def from_betas(betas: np.ndarray) -> Schedule:
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
    raise ValueError("betas must be a 1-D array with values in (0, 1].")
  return Schedule(alphas_cumprod=jnp.asarray(np.cumprod(1.0 - betas), dtype=jnp.float32))


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
  """Ho et al. (2020): β_t linear from beta_start to beta_end."""
  _check_num_timesteps(num_timesteps)
  return from_betas(np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64))


def cosine(num_timesteps: int = 1000, offset: float = 0.008, max_beta: float = 0.999) -> Schedule:
  """Nichol & Dhariwal (2021): ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2), β_t capped at max_beta."""
  _check_num_timesteps(num_timesteps)

  def alpha_bar(u):
    return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

  betas = [
      min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
      for i in range(num_timesteps)
  ]
  return from_betas(np.array(betas))


def get(name: str, num_timesteps: int = 1000) -> Schedule:
  """Looks a schedule up by its config name."""
  if name not in _BY_NAME:
    raise ValueError(f"Unknown noise schedule {name!r}; choose one of {sorted(_BY_NAME)}.")
  return _BY_NAME[name](num_timesteps)


def from_config(diffusion_config) -> Schedule:
  """The schedule of a config's `diffusion` section."""
  return get(diffusion_config.schedule, diffusion_config.num_timesteps)


def _check_num_timesteps(num_timesteps):
  if not isinstance(num_timesteps, int) or num_timesteps < 1:
    raise ValueError(f"num_timesteps must be a positive int, got {num_timesteps!r}.")


_BY_NAME = {"linear": linear, "cosine": cosine}
