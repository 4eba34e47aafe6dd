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

from cfg_jax import errors


# x_T must be close to N(0, I): every named schedule must leave at most this much ᾱ at T.
MAX_FINAL_ALPHA_CUMPROD = 1e-3


@flax.struct.dataclass
class Schedule:
  """ᾱ_t for t = 0..T-1 (float32, shape (T,)); a pytree, so it can be traced.

  `sqrt_alphas_cumprod` and `sqrt_one_minus_alphas_cumprod` are derived in float64 before
  the cast (guided-diffusion keeps the same tables): 1 − ᾱ in float32 loses 1.5e-3 of its
  value at t = 0. They are None only for a Schedule built from ᾱ alone.
  """

  alphas_cumprod: jnp.ndarray
  sqrt_alphas_cumprod: jnp.ndarray = None
  sqrt_one_minus_alphas_cumprod: jnp.ndarray = None

  @property
  def num_timesteps(self) -> int:
    return self.alphas_cumprod.shape[0]

  @property
  def betas(self) -> jnp.ndarray:
    prev = jnp.concatenate([jnp.ones((1,), self.alphas_cumprod.dtype), self.alphas_cumprod[:-1]])
    return 1.0 - self.alphas_cumprod / prev

  def scales(self, t):
    """(sqrt(ᾱ_t), sqrt(1 − ᾱ_t)) at timesteps t, from the float64-derived tables.

    t < 0 means "past the last step", where ᾱ = 1: (1, 0) exactly, as the samplers need for
    their final step (diffusers' `set_alpha_to_one`).
    """
    index = jnp.maximum(t, 0)
    if self.sqrt_alphas_cumprod is None:  # a Schedule built from ᾱ alone: float32 it is
      abar = self.alphas_cumprod[index]
      signal, noise = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
    else:
      signal, noise = self.sqrt_alphas_cumprod[index], self.sqrt_one_minus_alphas_cumprod[index]
    past_end = t < 0
    return jnp.where(past_end, 1.0, signal), jnp.where(past_end, 0.0, noise)

  def log_snr(self, t=None) -> jnp.ndarray:
    """λ_t = log(ᾱ_t / (1 − ᾱ_t)), for all t or the given timesteps."""
    abar = self.alphas_cumprod if t is None else self.alphas_cumprod[t]
    return jnp.log(abar) - jnp.log1p(-abar)


def from_alphas_cumprod(alphas_cumprod) -> Schedule:
  """A schedule with its float64-derived tables from ᾱ_t (given in float64 ideally)."""
  abar = np.asarray(alphas_cumprod, dtype=np.float64)
  as32 = lambda v: jnp.asarray(v, dtype=jnp.float32)
  return Schedule(alphas_cumprod=as32(abar), sqrt_alphas_cumprod=as32(np.sqrt(abar)),
                  sqrt_one_minus_alphas_cumprod=as32(np.sqrt(1.0 - abar)))


def from_betas(betas: np.ndarray) -> Schedule:
  betas = np.asarray(betas, dtype=np.float64)
  if betas.ndim != 1 or not np.all((betas > 0) & (betas <= 1)):
    raise errors.ConfigError("betas must be a 1-D array with values in (0, 1].")
  return from_alphas_cumprod(np.cumprod(1.0 - betas))


def linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
           max_beta: float = 0.999) -> Schedule:
  """Ho et al. (2020): β_t linear from beta_start to beta_end, both scaled by 1000/T.

  The scaling is guided-diffusion's (`get_named_beta_schedule("linear")`): it keeps ᾱ_T near
  0 for any T (unscaled, T = 250 would leave ᾱ_T = 0.08, so x_T would not be N(0, I)); at
  T = 1000 it is Ho et al.'s schedule. Needs T >= 20, where the scaled β_T reaches 1. β is
  capped at max_beta, as in the cosine schedule: at T = 20 an uncapped β_T = 1 gives ᾱ_T = 0,
  where x0 = (x_T − sqrt(1 − ᾱ_T)·ε)/sqrt(ᾱ_T) is NaN. With the default β range the cap
  changes only T = 20.
  """
  _check_num_timesteps(num_timesteps)
  scale = 1000.0 / num_timesteps
  if beta_end * scale > 1:
    raise errors.ConfigError(f"The linear schedule needs num_timesteps >= "
                             f"{math.ceil(1000 * beta_end)} (β scaled by 1000/T must stay <= 1), "
                             f"got {num_timesteps}; raise diffusion.num_timesteps.")
  betas = np.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=np.float64)
  return from_betas(np.minimum(betas, max_beta))


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
    raise errors.ConfigError(f"Unknown noise schedule {name!r}; choose one of {sorted(_BY_NAME)}.")
  schedule = _BY_NAME[name](num_timesteps)
  final = float(schedule.alphas_cumprod[-1])
  if final > MAX_FINAL_ALPHA_CUMPROD:
    raise errors.ConfigError(f"The {name} schedule with num_timesteps={num_timesteps} leaves "
                             f"ᾱ_T = {final:.3g}, so x_T is not N(0, I); raise "
                             "diffusion.num_timesteps.")
  return schedule


def from_config(diffusion_config) -> Schedule:
  """The schedule of a config's `diffusion` section."""
  return get(diffusion_config.schedule, diffusion_config.num_timesteps)


def _check_num_timesteps(num_timesteps):
  if not isinstance(num_timesteps, int) or num_timesteps < 1:
    raise errors.ConfigError(f"num_timesteps must be a positive int, got {num_timesteps!r}.")


_BY_NAME = {"linear": linear, "cosine": cosine}
NAMES = tuple(_BY_NAME)  # the config names `get` knows
