"""Independent float64 NumPy transcriptions of the samplers and guidance rules, for tests.

Each follows the paper (or diffusers' code) line by line rather than cfg_jax's code, so a
shared mistake is unlikely. ε-functions here are NumPy `eps(x, t, y)` with scalar t.
"""

import chex
import jax
import numpy as np

from cfg_jax.sampling import loop


def diffusers_timesteps(T, n, spacing, multistep=False):
  """diffusers' `set_timesteps`, copied literally (DDIMScheduler / DPMSolverMultistepScheduler)."""
  if spacing == "linspace":
    if multistep:
      return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
  if spacing == "leading":
    ratio = T // (n + 1) if multistep else T // n
    return (np.arange(0, n + 1 if multistep else n) * ratio).round()[::-1][
        :-1 if multistep else None].astype(np.int64)
  return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1  # trailing


def threshold(x0, p):
  """Imagen's dynamic thresholding, per example."""
  s = np.quantile(np.abs(x0).reshape(len(x0), -1), p, axis=1)
  s = np.maximum(s, 1.0).reshape((-1,) + (1,) * (x0.ndim - 1))
  return np.clip(x0, -s, s) / s


def cfg(eps_c, eps_u, t, abar, T, scale, interval=None, weight_schedule="constant",
        rescale=0.0):
  """CFG with Kynkäänniemi's interval, Wang's weight schedules and Lin's rescale."""
  w = {"constant": 1.0, "linear": 2 * (1 - t / T), "cosine": np.cos(np.pi * t / T) + 1}
  gamma = scale * w[weight_schedule]
  if interval is not None:
    sigma = np.sqrt((1 - abar) / abar)
    if not interval[0] < sigma <= interval[1]:
      gamma = 1.0
  eps = eps_u + gamma * (eps_c - eps_u)
  # diffusers' rescale_noise_cfg (torch's std is unbiased; the ratio is the same).
  std_c = eps_c.reshape(len(eps), -1).std(axis=1, ddof=1)[:, None]
  std = eps.reshape(len(eps), -1).std(axis=1, ddof=1)[:, None]
  return rescale * eps * (std_c / std) + (1 - rescale) * eps


def apg(x, abar, eps_c, eps_u, m, scale, eta, momentum, norm_threshold):
  """Sadat et al.'s APG on D; returns (ε̂, new momentum buffer)."""
  d_c = (x - np.sqrt(1 - abar) * eps_c) / np.sqrt(abar)
  d_u = (x - np.sqrt(1 - abar) * eps_u) / np.sqrt(abar)
  diff = d_c - d_u
  m = diff + momentum * m
  diff = m
  if norm_threshold > 0:
    norm = np.linalg.norm(diff, axis=1, keepdims=True)
    with np.errstate(divide="ignore"):  # Δ = 0 for the null label: nothing to cap
      diff = diff * np.minimum(1.0, norm_threshold / norm)
  unit = d_c / np.linalg.norm(d_c, axis=1, keepdims=True)
  parallel = (diff * unit).sum(1, keepdims=True) * unit
  d = d_c + (scale - 1) * ((diff - parallel) + eta * parallel)
  return (x - np.sqrt(abar) * d) / np.sqrt(1 - abar), m


def ddim(x_T, ts, abar_all, eps_step, *, eta=0.0, noises=None, clip=False, p=None, grad=None):
  """Song et al.'s DDIM from x_T over the timesteps `ts`; guided-diffusion's order of clipping
  and score shift. eps_step(x, t, state) -> (ε̂ for x0, ε̂ for the direction, state)."""
  x, state = np.asarray(x_T, np.float64), None
  for i, t in enumerate(ts):
    a = abar_all[t]
    a_prev = abar_all[ts[i + 1]] if i + 1 < len(ts) else 1.0
    eps, eps_dir, state = eps_step(x, t, state)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    if clip or p is not None:
      x0 = threshold(x0, p) if p is not None else np.clip(x0, -1, 1)
      new = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
      eps, eps_dir = new, eps_dir + (new - eps)
    if grad is not None:
      g = grad(x, t)
      eps, eps_dir = eps - np.sqrt(1 - a) * g, eps_dir - np.sqrt(1 - a) * g
      x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps_dir
    if eta:
      x = x + sigma * noises[i]
  return x


def ddpm(x_T, ts, abar_all, eps_step, noises, *, clip=False, p=None):
  """Ancestral sampling of Ho et al.'s posterior on the respaced chain."""
  x, state = np.asarray(x_T, np.float64), None
  for i, t in enumerate(ts):
    a = abar_all[t]
    a_prev = abar_all[ts[i + 1]] if i + 1 < len(ts) else 1.0
    eps, _, state = eps_step(x, t, state)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    if clip or p is not None:
      x0 = threshold(x0, p) if p is not None else np.clip(x0, -1, 1)
    beta = 1 - a / a_prev
    mean = (np.sqrt(a_prev) * beta * x0 + np.sqrt(1 - beta) * (1 - a_prev) * x) / (1 - a)
    x = mean + np.sqrt(beta * (1 - a_prev) / (1 - a)) * noises[i]
  return x


def dpmpp_2m(x_T, ts, abar_all, eps_step, *, clip=False, p=None, grad=None):
  """DPM-Solver++(2M), transcribed from diffusers' DPMSolverMultistepScheduler (midpoint,
  lower_order_final, final_sigmas_type="zero"), in float64."""
  sigmas = np.sqrt((1 - abar_all[ts]) / abar_all[ts])
  sigmas = np.append(sigmas, 0.0)
  alpha = 1 / np.sqrt(sigmas**2 + 1)
  sig = sigmas * alpha
  with np.errstate(divide="ignore"):
    lam = np.log(alpha) - np.log(sig)
  x, state, outputs = np.asarray(x_T, np.float64), None, []
  for i, t in enumerate(ts):
    eps, _, state = eps_step(x, t, state)
    if grad is not None:
      eps = eps - sig[i] * grad(x, t)  # score shift; sig = sqrt(1 − ᾱ_t)
    x0 = (x - sig[i] * eps) / alpha[i]
    if clip or p is not None:
      x0 = threshold(x0, p) if p is not None else np.clip(x0, -1, 1)
    outputs.append(x0)
    h = lam[i + 1] - lam[i]
    if i == 0 or i == len(ts) - 1:  # first order
      x = sig[i + 1] / sig[i] * x - alpha[i + 1] * (np.exp(-h) - 1.0) * x0
    else:
      m0, m1 = outputs[-1], outputs[-2]
      r0 = (lam[i] - lam[i - 1]) / h
      d0, d1 = m0, (1.0 / r0) * (m0 - m1)
      x = (sig[i + 1] / sig[i] * x - alpha[i + 1] * (np.exp(-h) - 1.0) * d0
           - 0.5 * alpha[i + 1] * (np.exp(-h) - 1.0) * d1)
  return x


def install_trace_counter(monkeypatch, n):
  """Makes the sampler fail (chex.assert_max_traces) once it is traced more than n times."""
  counted = chex.assert_max_traces(loop.sample_loop, n=n)
  monkeypatch.setattr(loop, "sample_loop_jit",
                      jax.jit(counted, static_argnames=loop.STATIC_ARGNAMES))
