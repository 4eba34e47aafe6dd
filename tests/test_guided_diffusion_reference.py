"""The samplers against openai/guided-diffusion's own (the `guided-diffusion-sdk` package):
classifier-guided DDIM (`ddim_sample_loop(cond_fn=…)`, Algorithm 2) and learned-variance
DDPM with the mean shift (`p_sample_loop(cond_fn=…)`, Algorithm 1), from the same x_T and
the same step noise, on small closed-form models written once in torch and once in JAX."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfg_jax import schedules, sampling

torch = pytest.importorskip("torch")
gaussian_diffusion = pytest.importorskip("guided_diffusion.gaussian_diffusion")
script_util = pytest.importorskip("guided_diffusion.script_util")

B, H, W, C, K = 3, 4, 4, 3, 5
WEIGHTS = np.random.default_rng(0).normal(size=(K, H, W, C)).astype(np.float32) * 0.3


def _eps_and_values(x, t, y, lib):
  """ε and the variance values v in [−1, 1] of a closed-form model (x NHWC, t, y (B,))."""
  t = t[:, None, None, None] * 1.0
  y = (y % 3)[:, None, None, None] * 1.0
  eps = lib.tanh(0.8 * x + 0.3 * lib.sin(t / 100.0) + 0.1 * y)
  values = lib.tanh(0.5 * x - 0.2 * lib.cos(t / 200.0))
  return eps, values


def _logits(x, t, lib, weights):
  """A linear noisy classifier (x NHWC): logits_k = (1 + t/1000)·⟨w_k, x⟩."""
  flat = x.reshape(x.shape[0], -1)
  return (flat @ weights.reshape(K, -1).T) * (1.0 + t[:, None] / 1000.0)


class _TorchModel(torch.nn.Module):
  def __init__(self, learned_variance):
    super().__init__()
    self.learned_variance = learned_variance
    self.unused = torch.nn.Parameter(torch.zeros(()))  # guided-diffusion reads the device

  def forward(self, x, t, y):  # NCHW, as guided-diffusion calls it
    eps, values = _eps_and_values(x.permute(0, 2, 3, 1), t.double().float(), y, torch)
    out = torch.cat([eps, values], -1) if self.learned_variance else eps
    return out.permute(0, 3, 1, 2)


def _cond_fn(scale):
  weights = torch.from_numpy(WEIGHTS)

  def cond_fn(x, t, y):
    with torch.enable_grad():
      x = x.detach().requires_grad_(True)
      log_probs = torch.log_softmax(_logits(x.permute(0, 2, 3, 1), t.float(), torch, weights), -1)
      picked = log_probs[range(len(y)), y.view(-1)]
      return torch.autograd.grad(picked.sum(), x)[0] * scale

  return cond_fn


def _jax_eps_fn(learned_variance):
  def eps_fn(x, t, y):
    eps, values = _eps_and_values(x, t, y, jnp)
    return jnp.concatenate([eps, values], -1) if learned_variance else eps

  return eps_fn


def _jax_classifier(x, t):
  return _logits(x, t.astype(jnp.float32), jnp, jnp.asarray(WEIGHTS))


def step_noise(key, ts, shape=(B, H, W, C)):
  """The noise `sampling.sample` draws at each visited timestep (from the second half of its
  key's split, folded with t), NCHW for guided-diffusion's `th.randn_like`."""
  loop_key = jax.random.split(key)[1]
  return [torch.from_numpy(np.asarray(jax.random.normal(
      jax.random.fold_in(loop_key, int(t)), shape)).transpose(0, 3, 1, 2).copy())
      for t in ts]


def _run_reference(monkeypatch, loop, respacing, learned_variance, noise, x_init, y, scale):
  # Without a learned variance, cfg-jax's DDPM is guided-diffusion's "fixed small" (β̃_t).
  diffusion = script_util.create_gaussian_diffusion(
      steps=1000, learn_sigma=learned_variance, sigma_small=not learned_variance,
      noise_schedule="linear", timestep_respacing=respacing)
  draws = iter(noise)
  monkeypatch.setattr(gaussian_diffusion.th, "randn_like", lambda x: next(draws))
  sample_loop = getattr(diffusion, loop)
  out = sample_loop(_TorchModel(learned_variance), (B, C, H, W),
                    noise=torch.from_numpy(x_init.transpose(0, 3, 1, 2).copy()),
                    clip_denoised=True, cond_fn=_cond_fn(scale),
                    model_kwargs={"y": torch.from_numpy(y)}, progress=False)
  return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("learned_variance", [True, False])
def test_classifier_guided_ddpm_equals_p_sample_loop(monkeypatch, learned_variance):
  """guided-diffusion's "250" respacing is timestep_spacing="linspace"; the mean shift
  μ + s·Σ·g uses the learned Σ where the model has one."""
  key, num_steps, scale = jax.random.key(3), 25, 3.0
  x_init = np.asarray(jax.random.normal(jax.random.key(9), (B, H, W, C)))
  y = np.array([0, 2, 4])
  ts = sampling.timesteps(1000, num_steps, "linspace", "ddpm")
  ours = sampling.sample(key, _jax_eps_fn(learned_variance), schedules.linear(1000), y,
                         x_init=x_init, method="ddpm", num_steps=num_steps,
                         timestep_spacing="linspace", classifier_fn=_jax_classifier,
                         classifier_scale=scale, learned_variance=learned_variance)
  noise = step_noise(key, ts)
  theirs = _run_reference(monkeypatch, "p_sample_loop", str(num_steps), learned_variance,
                          noise, x_init, y, scale)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5)
  # The check can fail: the fixed variance in place of the learned one (or back) differs.
  other = sampling.sample(key, _jax_eps_fn(not learned_variance), schedules.linear(1000), y,
                          x_init=x_init, method="ddpm", num_steps=num_steps,
                          timestep_spacing="linspace", classifier_fn=_jax_classifier,
                          classifier_scale=scale, learned_variance=not learned_variance)
  assert np.abs(np.asarray(other) - theirs).max() > 1e-2


def test_classifier_guided_ddim_equals_ddim_sample_loop(monkeypatch):
  """guided-diffusion's "ddimN" respacing is timestep_spacing="leading"; the score shift of
  Algorithm 2, ε̂ = ε − sqrt(1 − ᾱ_t)·g. The learned variance channels are ignored."""
  key, num_steps, scale = jax.random.key(4), 20, 5.0
  x_init = np.asarray(jax.random.normal(jax.random.key(8), (B, H, W, C)))
  y = np.array([1, 3, 0])
  ours = sampling.sample(key, _jax_eps_fn(True), schedules.linear(1000), y, x_init=x_init,
                         method="ddim", num_steps=num_steps, timestep_spacing="leading",
                         classifier_fn=_jax_classifier, classifier_scale=scale,
                         learned_variance=True)
  no_noise = [torch.zeros(B, C, H, W)] * num_steps  # η = 0: the draws are unused
  theirs = _run_reference(monkeypatch, "ddim_sample_loop", f"ddim{num_steps}", True, no_noise,
                          x_init, y, scale)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5)
  unguided = sampling.sample(key, _jax_eps_fn(True), schedules.linear(1000), y, x_init=x_init,
                             method="ddim", num_steps=num_steps, timestep_spacing="leading",
                             learned_variance=True)
  assert np.abs(np.asarray(unguided) - theirs).max() > 1e-2
