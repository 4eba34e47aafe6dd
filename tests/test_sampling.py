"""The sampler against exact answers (Gaussian data) and a NumPy reference loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfg_jax import sampling, schedules
from tests.gaussian_oracle import GaussianClasses

SCHEDULE = schedules.linear(1000)
MEANS = np.array([[0.6, -0.4], [-0.5, 0.5], [0.1, 0.7]])
ORACLE = GaussianClasses(SCHEDULE, MEANS, std=0.3)
NULL = ORACLE.num_classes
N = 3000


def _moments(x):
  x = np.asarray(x)
  return x.mean(axis=0), x.std(axis=0)


def test_timesteps_are_leading():
  np.testing.assert_array_equal(sampling.timesteps(1000, 50), np.arange(49, -1, -1) * 20)
  np.testing.assert_array_equal(sampling.timesteps(1000, 3), [666, 333, 0])
  np.testing.assert_array_equal(sampling.timesteps(10, 10), np.arange(9, -1, -1))


@pytest.mark.parametrize("method,num_steps", [("ddim", 50), ("ddpm", 1000)])
def test_conditional_samples_match_each_class(method, num_steps):
  labels = np.repeat(np.arange(3), N // 3)
  x = sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE, labels, image_shape=(2,),
                      method=method, num_steps=num_steps, clip_denoised=False,
                      guidance_scale=1.0, null_label=NULL)
  for k in range(3):
    mean, std = _moments(x[labels == k])
    np.testing.assert_allclose(mean, MEANS[k], atol=0.03)
    np.testing.assert_allclose(std, 0.3, atol=0.03)


def test_ddim_carries_unit_gaussian_to_a_single_gaussian():
  oracle = GaussianClasses(SCHEDULE, np.array([[0.25, -0.5, 0.0]]), std=0.5)
  errors = []
  for num_steps in (10, 250):  # the deterministic ODE converges as the steps shrink
    x = sampling.sample(jax.random.key(1), oracle.eps, SCHEDULE, np.zeros(N, int),
                        image_shape=(3,), method="ddim", num_steps=num_steps,
                        clip_denoised=False)
    mean, std = _moments(x)
    errors.append(np.abs(std - 0.5).max())
  np.testing.assert_allclose(mean, [0.25, -0.5, 0.0], atol=0.03)
  np.testing.assert_allclose(std, 0.5, atol=0.02)
  assert errors[1] < errors[0] / 3


def test_unconditional_guidance_scale_zero_samples_the_mixture():
  labels = np.zeros(N, int)  # γ = 0 must ignore the label entirely
  x = np.asarray(sampling.sample(jax.random.key(2), ORACLE.eps, SCHEDULE, labels,
                                 image_shape=(2,), num_steps=100, clip_denoised=False,
                                 guidance_scale=0.0, null_label=NULL))
  # Assign each sample to its nearest class mean: the mixture has equal weights.
  nearest = np.argmin(((x[:, None] - MEANS[None]) ** 2).sum(-1), axis=1)
  np.testing.assert_allclose(np.bincount(nearest, minlength=3) / N, [1 / 3] * 3, atol=0.04)
  np.testing.assert_allclose(x.mean(0), MEANS.mean(0), atol=0.04)


@pytest.mark.parametrize("method,num_steps", [("ddim", 100), ("ddpm", 1000)])
def test_classifier_guidance_on_unconditional_eps_samples_the_class(method, num_steps):
  """Bayes: ∇log p(x_t) + ∇log p(y|x_t) = ∇log p(x_t|y), so s = 1 gives the class."""
  labels = np.repeat(np.arange(3), N // 3)
  x = sampling.sample(jax.random.key(3), ORACLE.eps, SCHEDULE, labels, image_shape=(2,),
                      method=method, num_steps=num_steps, clip_denoised=False,
                      guidance_scale=0.0, null_label=NULL,
                      classifier_fn=ORACLE.logits, classifier_scale=1.0)
  for k in range(3):
    mean, std = _moments(x[labels == k])
    np.testing.assert_allclose(mean, MEANS[k], atol=0.04)
    np.testing.assert_allclose(std, 0.3, atol=0.04)


def _reference(x_T, labels, noises, method, num_steps, gamma, s, eta, clip, linear_eps,
               classifier_grad):
  """A float64 NumPy transcription of guided-diffusion's ddim_sample/p_sample loops."""
  abar_all = np.asarray(SCHEDULE.alphas_cumprod, np.float64)
  ts = sampling.timesteps(1000, num_steps)
  x = x_T.astype(np.float64)
  for i, t in enumerate(ts):
    a = abar_all[t]
    a_prev = abar_all[t - 1000 // num_steps] if t - 1000 // num_steps >= 0 else 1.0
    eps_c, eps_u = linear_eps(x, t, labels), linear_eps(x, t, np.full_like(labels, NULL))
    eps = eps_u + gamma * (eps_c - eps_u)
    x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
    if clip:
      x0 = np.clip(x0, -1, 1)
    g = s * classifier_grad(x, t, labels)
    if method == "ddim":
      eps = (x - np.sqrt(a) * x0) / np.sqrt(1 - a)
      eps = eps - np.sqrt(1 - a) * g  # condition_score
      x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
      sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
      x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * noises[i]
    else:
      beta = 1 - a / a_prev
      coef_x0 = np.sqrt(a_prev) * beta / (1 - a)
      coef_xt = np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
      mean = coef_x0 * x0 + coef_xt * x
      var = beta * (1 - a_prev) / (1 - a)
      mean = mean + var * g  # condition_mean
      x = mean + (t != 0) * np.sqrt(var) * noises[i]
  return x


@pytest.mark.parametrize("method,eta,clip", [("ddim", 0.0, True), ("ddim", 0.7, False),
                                             ("ddpm", 0.0, True)])
def test_trajectory_matches_numpy_reference_step_by_step(method, eta, clip):
  """Both guidances together; the classifier's gradient must be taken at x_t."""
  rng = np.random.default_rng(0)
  B, D, num_steps, gamma, s = 6, 4, 10, 2.5, 0.8
  W = rng.standard_normal((NULL + 1, D)) * 0.3
  A = rng.standard_normal((D, D)) * 0.2
  C = rng.standard_normal((3, D))

  def eps_np(x, t, y):  # a made-up, label- and time-dependent ε
    return np.tanh(x @ A + W[y] * (1 + t / 1000))

  def eps_jax(x, t, y):
    return jnp.tanh(x @ A + jnp.asarray(W)[y] * (1 + t[:, None] / 1000))

  def logits_jax(x, t):
    return jnp.sin(x @ C.T) * (1 + t[:, None] / 1000)

  def grad_np(x, t, y):
    # d/dx sin(x·C_y)·(1 + t/1000) − logsumexp(...), by hand.
    z = np.sin(x @ C.T) * (1 + t / 1000)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dz = (np.eye(3)[y] - p) * (1 + t / 1000)
    return (dz * np.cos(x @ C.T)) @ C

  labels = np.array([0, 1, 2, 0, 3, 1])  # one null label among them
  x_T = rng.standard_normal((B, D)).astype(np.float32)
  key = jax.random.key(7)
  out = sampling.sample(key, eps_jax, SCHEDULE, labels, x_init=x_T, method=method,
                        num_steps=num_steps, eta=eta, clip_denoised=clip,
                        guidance_scale=gamma, null_label=NULL, classifier_fn=logits_jax,
                        classifier_scale=s)
  # Reconstruct the sampler's noise: fold_in(loop_key, t) per step.
  _, loop_key = jax.random.split(key)
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(loop_key, t), (B, D)), np.float64)
            for t in sampling.timesteps(1000, num_steps)]
  # The null label gets no classifier guidance.
  ref = _reference(x_T, labels, noises, method, num_steps, gamma, s, eta, clip, eps_np,
                   lambda x, t, y: grad_np(x, t, np.minimum(y, 2)) * (y < 3)[:, None])
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-4, atol=1e-4)


def test_new_scale_labels_seed_or_eta_never_recompile():
  kwargs = dict(image_shape=(2,), num_steps=5, null_label=NULL, classifier_fn=ORACLE.logits)
  before = sampling._sample_jit._cache_size()
  sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE, [0, 1], guidance_scale=1.0,
                  classifier_scale=0.0, eta=0.0, **kwargs)
  compiled = sampling._sample_jit._cache_size()
  assert compiled == before + 1
  for seed, scale, cls_scale, labels, eta in [(1, 3.0, 0.5, [2, 2], 0.5), (2, 0, 2, [3, 0], 1)]:
    sampling.sample(jax.random.key(seed), ORACLE.eps, SCHEDULE, labels, guidance_scale=scale,
                    classifier_scale=cls_scale, eta=eta, **kwargs)
  assert sampling._sample_jit._cache_size() == compiled


@pytest.mark.parametrize("method", sampling.METHODS)
def test_sampler_runs_inside_jit_with_traced_arguments(method):
  @jax.jit
  def draw(key, labels, scale, cls_scale):
    return sampling.sample(key, ORACLE.eps, SCHEDULE, labels, image_shape=(2,), method=method,
                           num_steps=4, guidance_scale=scale, null_label=NULL,
                           classifier_fn=ORACLE.logits, classifier_scale=cls_scale)

  x = draw(jax.random.key(0), jnp.array([0, 1, 3]), 2.0, 1.0)
  assert x.shape == (3, 2) and bool(jnp.all(jnp.isfinite(x)))
  # vmapping over guidance scales (used by sweeps) works too.
  xs = jax.vmap(draw, in_axes=(None, None, 0, None))(jax.random.key(0), jnp.array([0, 1]),
                                                      jnp.array([0.0, 1.0, 3.0]), 0.0)
  assert xs.shape == (3, 2, 2)


def test_zero_classifier_scale_equals_no_classifier():
  args = (jax.random.key(4), ORACLE.eps, SCHEDULE, [0, 1, 2])
  kw = dict(image_shape=(2,), num_steps=8, guidance_scale=2.0, null_label=NULL)
  plain = sampling.sample(*args, **kw)
  zero = sampling.sample(*args, classifier_fn=ORACLE.logits, classifier_scale=0.0, **kw)
  np.testing.assert_allclose(plain, zero, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(labels=[0, 4]), "label 4 is out of range"),
        (dict(labels=[-1, 0]), "label -1 is out of range"),
        (dict(num_steps=0), "num_steps must be an int in 1..1000"),
        (dict(num_steps=1001), "num_steps must be an int in 1..1000"),
        (dict(method="euler"), "Unknown sampling method"),
        (dict(guidance_scale=float("nan")), "guidance_scale must be a finite scalar"),
        (dict(classifier_scale=float("inf")), "classifier_scale must be a finite scalar"),
        (dict(eta=-1.0), "eta must be >= 0"),
        (dict(method="ddpm", eta=0.5), "eta applies to method='ddim' only"),
        (dict(null_label=None, guidance_scale=3.0), "needs null_label"),
        (dict(classifier_scale=1.0), "no classifier_fn"),
        (dict(image_shape=None), "Give image_shape"),
        (dict(image_shape=None, x_init=np.zeros((3, 2))), "leading axis must equal"),
        (dict(x_init=np.zeros((2, 3))), "does not match image_shape"),
        (dict(labels=[[0, 1]]), "1-D integer array"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
  call = dict(labels=[0, 1], image_shape=(2,), null_label=NULL, guidance_scale=1.0)
  call.update(kwargs)
  labels = call.pop("labels")
  with pytest.raises(ValueError, match=message):
    sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE, labels, **call)


def test_zero_classifier_scale_evaluates_no_classifier():
  """With s = 0 the classifier's branch never runs: a NaN-producing classifier is harmless."""
  def poisoned(x, t):
    return jnp.full((x.shape[0], 3), jnp.nan) * jnp.sum(x)

  kw = dict(image_shape=(2,), num_steps=4, guidance_scale=1.0, null_label=NULL,
            classifier_fn=poisoned)
  clean = sampling.sample(jax.random.key(5), ORACLE.eps, SCHEDULE, [0, 1], classifier_scale=0.0,
                          **kw)
  assert bool(jnp.all(jnp.isfinite(clean)))
  guided = sampling.sample(jax.random.key(5), ORACLE.eps, SCHEDULE, [0, 1], classifier_scale=1.0,
                           **kw)
  assert not bool(jnp.all(jnp.isfinite(guided)))


def test_an_eps_fn_of_the_wrong_shape_is_caught():
  with pytest.raises(AssertionError, match="shape"):
    sampling.sample(jax.random.key(0), lambda x, t, y: x[:, :1], SCHEDULE, [0, 1],
                    image_shape=(2,), num_steps=2, guidance_scale=2.0, null_label=NULL)
