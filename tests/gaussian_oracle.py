"""Gaussian class-conditional data: exact ε-functions and the exact noisy classifier.

Class y has data N(μ_y, s²·I), classes equally likely. Under q(x_t | x_0),
x_t | y ~ N(sqrt(ᾱ_t)·μ_y, v_t·I) with v_t = ᾱ_t·s² + 1 − ᾱ_t, so
ε(x_t, t, y) = sqrt(1 − ᾱ_t)·(x_t − sqrt(ᾱ_t)·μ_y) / v_t, the unconditional ε mixes the class
terms with the posterior class weights, and p(y | x_t) is a softmax of −|x_t − sqrt(ᾱ_t)μ_y|²/(2v_t).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from cfg_jax.schedules import Schedule


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianClasses:
  schedule: Schedule
  means: np.ndarray  # (K, D)
  std: float

  @property
  def num_classes(self):
    return self.means.shape[0]

  def _stats(self, t):
    abar = self.schedule.alphas_cumprod[t][:, None]
    return abar, abar * self.std**2 + 1.0 - abar

  def logits(self, x_t, t):
    """Exact log p(y | x_t) up to a constant (the Bayes classifier)."""
    abar, var = self._stats(t)
    centred = x_t[:, None, :] - jnp.sqrt(abar)[:, :, None] * jnp.asarray(self.means)[None]
    return -jnp.sum(centred**2, axis=-1) / (2 * var)

  def eps_given_mean(self, x_t, t, mean):
    abar, var = self._stats(t)
    return jnp.sqrt(1.0 - abar) * (x_t - jnp.sqrt(abar) * mean) / var

  def eps_uncond(self, x_t, t):
    weights = jax.nn.softmax(self.logits(x_t, t), axis=-1)
    return self.eps_given_mean(x_t, t, weights @ jnp.asarray(self.means))

  def eps(self, x_t, t, y):
    """Exact ε(x_t, t, y); y == num_classes is the null label (unconditional)."""
    cond_mean = jnp.asarray(self.means)[jnp.minimum(y, self.num_classes - 1)]
    cond = self.eps_given_mean(x_t, t, cond_mean)
    return jnp.where((y == self.num_classes)[:, None], self.eps_uncond(x_t, t), cond)

  def sample_data(self, rng, labels):
    noise = rng.standard_normal((len(labels), self.means.shape[1]))
    return self.means[labels] + self.std * noise
