"""The respaced chain: which timesteps a sampler visits, and ᾱ and β of each of its steps.

`timesteps` lays the grid out as diffusers' schedulers do; each step goes from a visited t to
the next visited t_prev (−1 past the last, where ᾱ = 1: diffusers' `set_alpha_to_one`,
guided-diffusion's `alphas_cumprod_prev`), and β_t = 1 − ᾱ_t/ᾱ_{t_prev} is the β of that step
(guided-diffusion's `respace.py`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cfg_jax import errors

SPACINGS = ("leading", "trailing", "linspace")


def timesteps(num_timesteps: int, num_steps: int, spacing: str = "leading",
              method: str = "ddim") -> np.ndarray:
  """The visited timesteps, largest first, as diffusers' schedulers lay them out.

  DDIM/DDPM follow `DDIMScheduler`; "dpmpp_2m" follows `DPMSolverMultistepScheduler`, whose
  "leading" and "linspace" lay num_steps + 1 points and drop the last (t = 0).
  """
  T, n = num_timesteps, num_steps
  multistep = method == "dpmpp_2m"
  if spacing == "leading":
    if multistep:
      ts = np.arange(n, 0, -1) * (T // (n + 1))
    else:
      ts = np.arange(n - 1, -1, -1) * (T // n)
  elif spacing == "trailing":
    # diffusers' round(arange(T, 0, −T/n)) − 1, written so float error never adds a point.
    ts = np.round(T - np.arange(n) * (T / n)) - 1
  elif spacing == "linspace":
    if multistep:
      ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    else:
      ts = np.linspace(0, T - 1, n).round()[::-1]
  else:
    raise errors.InputError(f"Unknown timestep_spacing {spacing!r}; use one of {SPACINGS}.")
  return np.asarray(ts, np.int32)


def alphas_cumprod_at(schedule, t):
  """ᾱ_t, and 1 past the last step (t < 0)."""
  return jnp.where(t >= 0, schedule.alphas_cumprod[jnp.maximum(t, 0)], 1.0)


def respaced_beta(schedule, t, t_prev):
  """β_t = 1 − ᾱ_t/ᾱ_{t−1} of the respaced chain, as (ᾱ_{t−1} − ᾱ_t)/ᾱ_{t−1}.

  The difference is taken in whichever of ᾱ and 1 − ᾱ (the float64-derived table) is small:
  in float32 the other has lost the digits (ᾱ_0 ≈ 1 keeps 1 − ᾱ_0 to only 6e-4).
  """
  abar, abar_prev = alphas_cumprod_at(schedule, t), alphas_cumprod_at(schedule, t_prev)
  _, noise_std = schedule.scales(t)
  _, noise_std_prev = schedule.scales(t_prev)
  diff = jnp.where(abar_prev > 0.5, noise_std**2 - noise_std_prev**2, abar_prev - abar)
  return diff / abar_prev
