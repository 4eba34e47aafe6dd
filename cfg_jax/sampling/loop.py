"""The sampler as one compiled program: a `lax.scan` over the visited timesteps, each step the
guided ε̂ (`guided`), the classifier gradient and one solver step (`ddim`, `ddpm`,
`dpm_solver`). A 1-D array of scales is vmapped over inside the same program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cfg_jax import guidance
from cfg_jax.sampling.ddim import ddim_step
from cfg_jax.sampling.ddpm import ddpm_step
from cfg_jax.sampling.dpm_solver import dpmpp_2m_step
from cfg_jax.sampling.guided import classifier_gradient, guided_eps, model_output
from cfg_jax.sampling.respacing import timesteps


def sample_loop(key, eps_fn, classifier_fn, schedule, labels, one_pass_labels, x_init, rule,
                classifier_scale, eta, dynamic_threshold, *, image_shape, method, num_steps,
                spacing, clip_denoised, null_label, passes, learned_variance=False,
                guided_channels=None):
  """The whole sampler as one `lax.scan` over the visited timesteps (see `sampling.sample`)."""
  init_key, loop_key = jax.random.split(key)
  batch = labels.shape[0]
  if x_init is None:
    x_init = jax.random.normal(init_key, (batch, *image_shape), jnp.float32)
  ts = timesteps(schedule.num_timesteps, num_steps, spacing, method)
  ts_prev = np.append(ts[1:], -1)  # the next visited timestep; −1: ᾱ = 1
  ts_last = np.insert(ts[:-1], 0, -1)  # the one visited before (DPM-Solver++'s history)
  xs = tuple(jnp.asarray(v, jnp.int32) for v in (ts, ts_prev, ts_last, np.arange(len(ts))))
  zero_init = isinstance(rule, guidance.CFGZeroStar)  # its first steps keep x as it is

  def run(rule):
    def step(carry, scanned):
      x_t, state, x0_last = carry
      *times, index = scanned
      t, t_prev, t_last = (jnp.full((batch,), v, jnp.int32) for v in times)
      ctx = guidance.StepContext(schedule, x_t, t)
      if passes == "one":  # γ = 1 or γ = 0: ε̂ = ε(x_t, t, y) or ε(x_t, t, ∅)
        eps, values = model_output(eps_fn, x_t, t, one_pass_labels, learned_variance)
        eps_renoise = eps
      else:
        labels_key = (rule_key(key, times[0], schedule.num_timesteps)
                      if isinstance(rule, guidance.IndependentCondition) else None)
        eps, eps_renoise, state, values = guided_eps(
            rule, passes, eps_fn, ctx, labels, null_label, state, learned_variance,
            guided_channels, labels_key)
      grad = None
      if classifier_fn is not None:
        grad = classifier_gradient(classifier_fn, x_t, t, labels, classifier_scale)
      if method == "dpmpp_2m":
        if zero_init:  # a step after a held one starts the multistep history afresh
          t_last = jnp.where(rule.holds_x(index - 1), -1, t_last)
        x_prev, x0_last = dpmpp_2m_step(schedule, x_t, t, t_prev, t_last, eps, grad, x0_last,
                                        clip_denoised, dynamic_threshold)
      else:
        # Drawn from the step's timestep alone: every scale of a sweep sees the same noise.
        noise = jax.random.normal(jax.random.fold_in(loop_key, times[0]), x_t.shape,
                                  x_t.dtype)
        if method == "ddim":
          renoise = eps_renoise if isinstance(rule, guidance.CFGPlusPlus) else None
          x_prev = ddim_step(schedule, x_t, t, t_prev, eps, grad, eta, noise, clip_denoised,
                             dynamic_threshold, renoise)
        else:
          x_prev = ddpm_step(schedule, x_t, t, t_prev, eps, grad, noise, clip_denoised,
                             dynamic_threshold, values, t_last)
      if zero_init:
        x_prev = jnp.where(rule.holds_x(index), x_t, x_prev)
      return (x_prev, state, x0_last), None

    x0_init = jnp.zeros_like(x_init) if method == "dpmpp_2m" else ()
    (x_0, _, _), _ = jax.lax.scan(step, (x_init, rule.init_state(x_init), x0_init), xs)
    return x_0

  if jnp.ndim(rule.scale) == 1:  # a sweep: one program, vmapped over the scales
    return jax.vmap(lambda scale: run(rule.replace(scale=scale)))(rule.scale)
  return run(rule)


def rule_key(key, t, num_timesteps):
  """The key a rule draws from at the visited timestep t (ICG's labels): folded from the
  step noise's key at T, which no timestep takes, so it is apart from x_T and from every
  step's noise; and it depends on t alone, so every scale of a sweep draws the same."""
  _, loop_key = jax.random.split(key)
  return jax.random.fold_in(jax.random.fold_in(loop_key, num_timesteps), t)


STATIC_ARGNAMES = ("image_shape", "method", "num_steps", "spacing", "clip_denoised",
                   "null_label", "passes", "learned_variance", "guided_channels")
sample_loop_jit = jax.jit(sample_loop, static_argnames=STATIC_ARGNAMES)
