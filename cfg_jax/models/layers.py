"""Layer helpers every network family shares."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
  """Sinusoidal features of timesteps, cos then sin, a zero column for odd `dim`
  (guided-diffusion's `nn.timestep_embedding`)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  features = [jnp.cos(args), jnp.sin(args)]
  if dim % 2:
    features.append(jnp.zeros_like(args[:, :1]))
  return jnp.concatenate(features, axis=-1)


def dropout(x, rate: float, key):
  """Inverted dropout with an explicit key; the identity without one (at sampling)."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


def fold(key, index):
  """`fold_in(key, index)`, or None without a key: one dropout key per layer."""
  return None if key is None else jax.random.fold_in(key, index)
