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
                spacing, clip_denoised, null_label, passes, learned_variance=False):
  """The whole sampler as one `lax.scan` over the visited timesteps (see `sampling.sample`)."""
  init_key, loop_key = jax.random.split(key)
  batch = labels.shape[0]
  if x_init is None:
    x_init = jax.random.normal(init_key, (batch, *image_shape), jnp.float32)
  ts = timesteps(schedule.num_timesteps, num_steps, spacing, method)
  ts_prev = np.append(ts[1:], -1)  # the next visited timestep; −1: ᾱ = 1
  ts_last = np.insert(ts[:-1], 0, -1)  # the one visited before (DPM-Solver++'s history)
  xs = tuple(jnp.asarray(v, jnp.int32) for v in (ts, ts_prev, ts_last))

  def run(rule):
    def step(carry, times):
      x_t, state, x0_last = carry
      t, t_prev, t_last = (jnp.full((batch,), v, jnp.int32) for v in times)
      ctx = guidance.StepContext(schedule, x_t, t)
      if passes == "one":  # γ = 1 or γ = 0: ε̂ = ε(x_t, t, y) or ε(x_t, t, ∅)
        eps, values = model_output(eps_fn, x_t, t, one_pass_labels, learned_variance)
        eps_renoise = eps
      else:
        eps, eps_renoise, state, values = guided_eps(rule, passes, eps_fn, ctx, labels,
                                                     null_label, state, learned_variance)
      grad = None
      if classifier_fn is not None:
        grad = classifier_gradient(classifier_fn, x_t, t, labels, classifier_scale)
      if method == "dpmpp_2m":
        x_prev, x0_last = dpmpp_2m_step(schedule, x_t, t, t_prev, t_last, eps, grad, x0_last,
                                        clip_denoised, dynamic_threshold)
        return (x_prev, state, x0_last), None
      # Drawn from the step's timestep alone: every scale of a sweep sees the same noise.
      noise = jax.random.normal(jax.random.fold_in(loop_key, times[0]), x_t.shape, x_t.dtype)
      if method == "ddim":
        renoise = eps_renoise if isinstance(rule, guidance.CFGPlusPlus) else None
        x_prev = ddim_step(schedule, x_t, t, t_prev, eps, grad, eta, noise, clip_denoised,
                           dynamic_threshold, renoise)
      else:
        x_prev = ddpm_step(schedule, x_t, t, t_prev, eps, grad, noise, clip_denoised,
                           dynamic_threshold, values, t_last)
      return (x_prev, state, x0_last), None

    x0_init = jnp.zeros_like(x_init) if method == "dpmpp_2m" else ()
    (x_0, _, _), _ = jax.lax.scan(step, (x_init, rule.init_state(x_init), x0_init), xs)
    return x_0

  if jnp.ndim(rule.scale) == 1:  # a sweep: one program, vmapped over the scales
    return jax.vmap(lambda scale: run(rule.replace(scale=scale)))(rule.scale)
  return run(rule)


STATIC_ARGNAMES = ("image_shape", "method", "num_steps", "spacing", "clip_denoised",
                   "null_label", "passes", "learned_variance")
sample_loop_jit = jax.jit(sample_loop, static_argnames=STATIC_ARGNAMES)
