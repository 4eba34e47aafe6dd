"""The sampler against exact answers (Gaussian data) and a NumPy reference loop."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfg_jax import errors, guidance, sampling, schedules
from cfg_jax.sampling import ddim, ddpm, dpm_solver, guided
from tests import reference_samplers as ref
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
  std_errors = []
  for num_steps in (10, 250):  # the deterministic ODE converges as the steps shrink
    x = sampling.sample(jax.random.key(1), oracle.eps, SCHEDULE, np.zeros(N, int),
                        image_shape=(3,), method="ddim", num_steps=num_steps,
                        clip_denoised=False)
    mean, std = _moments(x)
    std_errors.append(np.abs(std - 0.5).max())
  np.testing.assert_allclose(mean, [0.25, -0.5, 0.0], atol=0.03)
  np.testing.assert_allclose(std, 0.5, atol=0.02)
  assert std_errors[1] < std_errors[0] / 3


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
  abar_all = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # float64, as the tables derive
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


def test_new_scale_labels_seed_or_eta_never_recompile(monkeypatch):
  # s = 0 is its own program (no classifier gradient at all); every s ≠ 0 shares one.
  ref.install_trace_counter(monkeypatch, n=1)  # chex.assert_max_traces on the sampler
  kwargs = dict(image_shape=(2,), num_steps=5, null_label=NULL, classifier_fn=ORACLE.logits)
  for seed, scale, cls_scale, labels, eta in [(0, 2.0, 1.0, [0, 1], 0.0),
                                              (1, 3.0, 0.5, [2, 2], 0.5),
                                              (2, -1, 2, [3, 0], 1)]:
    sampling.sample(jax.random.key(seed), ORACLE.eps, SCHEDULE, labels, guidance_scale=scale,
                    classifier_scale=cls_scale, eta=eta, **kwargs)


def test_unconditional_and_conditional_scales_share_one_single_pass_program(monkeypatch):
  ref.install_trace_counter(monkeypatch, n=1)
  args = (jax.random.key(3), ORACLE.eps, SCHEDULE, [0, 1, 2])
  kw = dict(image_shape=(2,), num_steps=6, null_label=NULL)
  uncond, cond = (sampling.sample(*args, guidance_scale=g, **kw) for g in (0.0, 1.0))
  # Each equals the same scale swept, which runs both passes (a second program).
  monkeypatch.undo()
  swept = sampling.sample(*args, guidance_scale=jnp.array([0.0, 1.0]), **kw)
  np.testing.assert_allclose(uncond, swept[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cond, swept[1], rtol=1e-5, atol=1e-5)
  assert not np.allclose(uncond, cond, atol=1e-3)


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
  # A traced 0 computes the gradient (there is no lax.cond) and scales it to nothing.
  traced = jax.jit(lambda s: sampling.sample(*args, classifier_fn=ORACLE.logits,
                                             classifier_scale=s, **kw))
  np.testing.assert_allclose(plain, traced(0.0), rtol=1e-6, atol=1e-6)
  assert not np.allclose(plain, traced(2.0), atol=1e-3)


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
        (dict(guidance_scale=np.ones((2, 2))), "1-D array of scales"),
        (dict(guidance=guidance.CFG(2.0)), "not both"),
        (dict(guidance_scale=None, guidance=2.0), "guidance must be one of"),
        (dict(guidance_scale=None, guidance=guidance.CFGPlusPlus(0.5), method="ddpm"),
         "CFGPlusPlus works with method='ddim' only"),
        (dict(guidance_scale=None, guidance=guidance.CFGPlusPlus(0.5), method="dpmpp_2m"),
         "CFGPlusPlus works with method='ddim' only"),
        (dict(guidance_scale=None, guidance=guidance.APG(2.0), null_label=None),
         "APG needs null_label"),
        (dict(guidance_scale=None, guidance=guidance.Autoguidance(2.0)), "needs weak_eps_fn"),
        (dict(method="dpmpp_2m", eta=0.5), "eta applies to method='ddim' only"),
        (dict(dynamic_threshold=0.0), r"dynamic_threshold must be a percentile in \(0, 1\]"),
        (dict(dynamic_threshold=1.5), "dynamic_threshold must be a percentile"),
        (dict(timestep_spacing="uniform"), "Unknown timestep_spacing"),
        (dict(timestep_spacing="leading", num_steps=3), "use timestep_spacing='trailing'"),
        (dict(timestep_spacing="leading", num_steps=600), "use timestep_spacing='trailing'"),
        (dict(timestep_spacing="leading", num_steps=2), r"starts at t=500 .* ᾱ=0.0778 > 0.01"),
        (dict(timestep_spacing="leading", num_steps=1, method="dpmpp_2m"), "starts at t=500"),
        (dict(null_label=None, labels=[0, 50], num_classes=3),
         r"label 50 is out of range; labels must be 0..2 \(num_classes=3\)\."),
        (dict(labels=[0, 4], num_classes=3), r"must be 0..2 \(num_classes=3\) or 3 \(null_label\)"),
        (dict(num_classes=-1), "num_classes must be a non-negative int"),
        (dict(method="dpmpp_2m", timestep_spacing="linspace", num_steps=1000),
         "repeats timesteps"),
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
  with pytest.raises(ValueError, match=message) as info:
    sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE, labels, **call)
  assert "\n" not in str(info.value)


def test_zero_classifier_scale_evaluates_no_classifier():
  """With s = 0 the classifier's branch never runs: a NaN-producing classifier is harmless."""
  def poisoned(x, t):
    return jnp.full((x.shape[0], 3), jnp.nan) * jnp.sum(x)

  kw = dict(image_shape=(2,), num_steps=4, guidance_scale=1.0, null_label=NULL,
            classifier_fn=poisoned)
  clean = sampling.sample(jax.random.key(5), ORACLE.eps, SCHEDULE, [0, 1], classifier_scale=0.0,
                          **kw)
  assert bool(jnp.all(jnp.isfinite(clean)))
  with pytest.raises(errors.NonFiniteError, match="2 of 2 samples hold NaN"):
    sampling.sample(jax.random.key(5), ORACLE.eps, SCHEDULE, [0, 1], classifier_scale=1.0, **kw)


def test_an_eps_fn_of_the_wrong_shape_is_caught():
  with pytest.raises(AssertionError, match="shape"):
    sampling.sample(jax.random.key(0), lambda x, t, y: x[:, :1], SCHEDULE, [0, 1],
                    image_shape=(2,), num_steps=4, guidance_scale=2.0, null_label=NULL)


# --- Timestep spacings, DPM-Solver++(2M) and diffusers --------------------------------------

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)
DIFF_SCHEDULE = schedules.from_betas(BETAS)  # the betas diffusers gets as trained_betas
DIFF_ABAR = np.cumprod(1 - BETAS)  # float64: the references never round ᾱ to float32
_RNG = np.random.default_rng(1)
_A = _RNG.standard_normal((4, 4)) * 0.3
_W = _RNG.standard_normal((4,)) * 0.5


def _eps_np(x, t):  # one ε-function for every sampler compared below
  return np.tanh(x @ _A + _W * (1 + t / T))


def _eps_jax(x, t, y):
  return jnp.tanh(x @ jnp.asarray(_A) + jnp.asarray(_W) * (1 + t[:, None] / T))


def _np_step(x, t, state):
  e = _eps_np(x, t)
  return e, e, state


@pytest.mark.parametrize("method", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_timestep_spacings_are_diffusers(method, spacing):
  multistep = method == "dpmpp_2m"
  for n in (1, 3, 7, 10, 50, 333, 999):
    want = ref.diffusers_timesteps(T, n, spacing, multistep)
    np.testing.assert_array_equal(sampling.timesteps(T, n, spacing, method), want)
  if spacing == "trailing":  # starts at T − 1 for every num_steps
    assert all(sampling.timesteps(T, n, spacing, method)[0] == T - 1 for n in range(1, T + 1))


def test_default_leading_far_below_T_warns_and_keeps_todays_samples():
  kw = dict(image_shape=(2,), num_steps=3, null_label=NULL, guidance_scale=2.0)
  with pytest.warns(UserWarning, match="trailing"):
    x = sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE, [0, 1], **kw)
  assert x.shape == (2, 2)


def _eps_jax_2d(x, t, y):
  return jnp.tanh(x) * 0.5


@pytest.mark.parametrize("schedule,num_steps,warns", [
    (SCHEDULE, 2, True),  # T % n == 0, yet t = 500 has ᾱ = 0.08
    (SCHEDULE, 4, False),  # t = 750: ᾱ = 3e-3 on the linear schedule
    (schedules.cosine(1000), 4, True),  # the cosine schedule keeps ᾱ = 0.14 at t = 750
    (schedules.cosine(1000), 10, True),  # t = 900: ᾱ = 0.024
    (schedules.cosine(1000), 50, False),  # t = 980: ᾱ = 9e-4
    (SCHEDULE, 7, False),  # T % n != 0, but t = 852 is pure noise already
])
def test_default_leading_warns_exactly_when_x_T_is_not_pure_noise(schedule, num_steps, warns):
  """What matters is ᾱ at the first visited timestep, not whether num_steps divides T."""
  kw = dict(image_shape=(2,), num_steps=num_steps, clip_denoised=False)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sampling.sample(jax.random.key(0), _eps_jax_2d, schedule, [0], **kw)
  assert any("is not pure noise" in str(w.message) for w in caught) == warns
  # trailing starts at T − 1 for every num_steps: never a warning, never an error.
  sampling.check_options(schedule, num_steps=num_steps, timestep_spacing="trailing")
  if warns:
    with pytest.raises(errors.InputError, match="use timestep_spacing='trailing'"):
      sampling.check_options(schedule, num_steps=num_steps, timestep_spacing="leading")


@pytest.mark.parametrize("kwargs,message", [
    (dict(timestep_spacing="leading", num_steps=4), "use timestep_spacing='trailing'"),
    (dict(dynamic_threshold=1.5), "dynamic_threshold must be a percentile"),
    (dict(method="ddpm", eta=0.5), "eta applies to method='ddim' only"),
    (dict(num_steps=1001), "num_steps must be an int in 1..1000"),
    (dict(timestep_spacing="uniform"), "Unknown timestep_spacing"),
])
def test_check_options_runs_the_samplers_checks_without_sampling(kwargs, message):
  with pytest.raises(errors.InputError, match=message):
    sampling.check_options(schedules.cosine(1000), **kwargs)
  sampling.check_options(schedules.cosine(1000), num_steps=4)  # the default only warns


def test_out_of_range_labels_without_null_label_are_caught():
  """An embedding looked up past its table gives NaN (nnx.Embed does): num_classes refuses
  such labels up front, and without it the NaN samples raise instead of returning."""
  table = jnp.asarray(np.random.default_rng(5).standard_normal((3, 2)), jnp.float32)

  def embed_eps(x, t, y):  # like nnx.Embed: NaN rows out of range
    return 0.1 * x + jnp.take(table, y, axis=0, mode="fill", fill_value=jnp.nan)

  kw = dict(image_shape=(2,), num_steps=5, null_label=None)
  with pytest.raises(errors.InputError, match="label 50 is out of range"):
    sampling.sample(jax.random.key(0), embed_eps, SCHEDULE, [0, 50], num_classes=3, **kw)
  with pytest.raises(errors.NonFiniteError, match="1 of 2 samples hold NaN"):
    sampling.sample(jax.random.key(0), embed_eps, SCHEDULE, [0, 50], **kw)
  # Inside the caller's jit the values are the caller's: no check, no error.
  traced = jax.jit(lambda y: sampling.sample(jax.random.key(0), embed_eps, SCHEDULE, y, **kw))
  assert np.isnan(np.asarray(traced(jnp.array([0, 50])))[1]).all()
  ok = sampling.sample(jax.random.key(0), embed_eps, SCHEDULE, [0, 2], num_classes=3, **kw)
  assert np.isfinite(np.asarray(ok)).all()


def test_short_linear_schedule_samples_finite_values():
  """linear(20) would end at β = 1 (ᾱ_T = 0, x0 = x/0); β is capped at 0.999 instead."""
  schedule = schedules.linear(20)
  assert 0 < float(schedule.alphas_cumprod[-1]) < 1e-3
  for method in sampling.METHODS:
    x = sampling.sample(jax.random.key(0), _eps_jax_2d, schedule, [0, 0], image_shape=(2,),
                        num_steps=20, method=method, clip_denoised=False,
                        timestep_spacing="trailing")
    assert np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize("t,t_prev", [(1, 0), (5, 2), (20, 0), (40, 20), (500, 400), (0, -1)])
def test_steps_match_float64_near_t0(t, t_prev):
  """Near t = 0, 1 − ᾱ in float32 keeps about four digits (ᾱ_0 = 0.9999), which cost the
  DDPM step 1e-4: every step must take sqrt(1 − ᾱ) and β from the float64-derived tables."""
  abar = np.cumprod(1 - BETAS)  # float64
  a, a_prev = abar[t], (abar[t_prev] if t_prev >= 0 else 1.0)
  rng = np.random.default_rng(4)
  x_t, eps, z, g = (rng.standard_normal((1, 4)).astype(np.float32) for _ in range(4))
  x, e, noise = (v.astype(np.float64) for v in (x_t, eps, z))
  beta = 1 - a / a_prev
  x0 = (x - np.sqrt(1 - a) * e) / np.sqrt(a)
  want_ddpm = ((np.sqrt(a_prev) * beta * x0 + np.sqrt(1 - beta) * (1 - a_prev) * x) / (1 - a)
               + np.sqrt(beta * (1 - a_prev) / (1 - a)) * noise)
  eta = 0.5
  sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * beta)
  want_ddim = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * e + sigma * noise
  t_b, t_prev_b = jnp.array([t]), jnp.array([t_prev])
  got_ddpm = ddpm.ddpm_step(DIFF_SCHEDULE, x_t, t_b, t_prev_b, eps, None, z, False)
  got_ddim = ddim.ddim_step(DIFF_SCHEDULE, x_t, t_b, t_prev_b, eps, None, eta, z, False)
  np.testing.assert_allclose(got_ddpm, want_ddpm, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(got_ddim, want_ddim, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(guided.score_shift(DIFF_SCHEDULE, t_b, g),
                             np.sqrt(1 - a) * g.astype(np.float64), rtol=1e-6)
  if t_prev >= 0:  # a first-order DPM-Solver++ step (the first of a run)
    lam = lambda v: 0.5 * np.log(v / (1 - v))
    h = lam(a_prev) - lam(a)
    want = np.sqrt((1 - a_prev) / (1 - a)) * x - np.sqrt(a_prev) * np.expm1(-h) * x0
    got, _ = dpm_solver.dpmpp_2m_step(DIFF_SCHEDULE, x_t, t_b, t_prev_b, jnp.array([-1]), eps,
                                    None, jnp.zeros_like(x_t), False)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _x_T():
  return np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)


@pytest.mark.parametrize("method,spacing,num_steps", [("dpmpp_2m", "linspace", 10),
                                                      ("dpmpp_2m", "linspace", 20),
                                                      ("dpmpp_2m", "trailing", 15),
                                                      ("ddim", "trailing", 10)])
def test_sampler_matches_float64_reference(method, spacing, num_steps):
  """Runs with or without diffusers: our own float64 transcription of diffusers' steps."""
  x_T = _x_T()
  out = sampling.sample(jax.random.key(0), _eps_jax, DIFF_SCHEDULE, [0, 0, 0], x_init=x_T,
                        method=method, num_steps=num_steps, clip_denoised=False,
                        timestep_spacing=spacing)
  ts = ref.diffusers_timesteps(T, num_steps, spacing, multistep=method == "dpmpp_2m")
  loop = ref.dpmpp_2m if method == "dpmpp_2m" else ref.ddim
  np.testing.assert_allclose(np.asarray(out), loop(x_T, ts, DIFF_ABAR, _np_step),
                             rtol=1e-4, atol=1e-4)


def _diffusers_loop(scheduler, x_T, num_steps):
  import torch

  scheduler.set_timesteps(num_steps)
  x = torch.from_numpy(x_T)
  trajectory = []
  for t in scheduler.timesteps:
    eps = torch.from_numpy(_eps_np(x.numpy().astype(np.float64), int(t)).astype(np.float32))
    x = scheduler.step(eps, t, x).prev_sample
    trajectory.append(x.numpy())
  return trajectory, np.asarray(scheduler.timesteps)


@pytest.mark.parametrize("method,spacing,num_steps", [("dpmpp_2m", "linspace", 10),
                                                      ("dpmpp_2m", "linspace", 20),
                                                      ("ddim", "trailing", 10),
                                                      ("ddim", "trailing", 50)])
def test_sampler_matches_diffusers_scheduler(method, spacing, num_steps):
  diffusers = pytest.importorskip("diffusers")
  if method == "dpmpp_2m":
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=BETAS, algorithm_type="dpmsolver++",
        solver_order=2, lower_order_final=True, final_sigmas_type="zero",
        timestep_spacing=spacing)
  else:
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=T, trained_betas=BETAS,
                                        clip_sample=False, timestep_spacing=spacing)
  x_T = _x_T()
  trajectory, ts = _diffusers_loop(scheduler, x_T, num_steps)
  np.testing.assert_array_equal(sampling.timesteps(T, num_steps, spacing, method), ts)
  # The whole trajectory from the same x_T and the same ε (float32 on both sides).
  kw = dict(method=method, clip_denoised=False, timestep_spacing=spacing, num_steps=num_steps)
  out = sampling.sample(jax.random.key(0), _eps_jax, DIFF_SCHEDULE, [0, 0, 0], x_init=x_T, **kw)
  np.testing.assert_allclose(np.asarray(out), trajectory[-1], rtol=1e-4, atol=1e-4)


def test_dpmpp_2m_is_second_order_on_gaussian_data():
  """With the exact ε, against the 1000-step DDIM end point: halving the step halves DDIM's
  error (first order) and cuts DPM-Solver++(2M)'s by more than 3 (its last step to σ = 0 is
  first order, so the gain shows from about 40 steps)."""
  x_T = np.random.default_rng(3).standard_normal((30, 2)).astype(np.float32)
  kw = dict(x_init=x_T, clip_denoised=False, null_label=NULL, guidance_scale=1.0,
            timestep_spacing="trailing")
  labels = np.arange(30) % 3
  exact = sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE, labels, num_steps=1000,
                          **kw)
  err = {(m, n): float(np.abs(sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE, labels,
                                              num_steps=n, method=m, **kw) - exact).max())
         for m in ("ddim", "dpmpp_2m") for n in (20, 40)}
  assert err["dpmpp_2m", 20] / err["dpmpp_2m", 40] > 3 > err["ddim", 20] / err["ddim", 40], err
  assert err["dpmpp_2m", 40] < err["ddim", 40] / 3, err


@pytest.mark.slow
def test_dpmpp_2m_samples_each_class():
  """50 steps: the final first-order step returns x̂0 = E[x0 | x_t] from the last visited t,
  which shrinks the std by s²/(s² + σ_t²) (0.22 instead of 0.3 at 15 steps, 0.29 at 50)."""
  labels = np.repeat(np.arange(3), N // 3)
  x = sampling.sample(jax.random.key(5), ORACLE.eps, SCHEDULE, labels, image_shape=(2,),
                      method="dpmpp_2m", num_steps=50, timestep_spacing="trailing",
                      clip_denoised=False, guidance_scale=1.0, null_label=NULL)
  for k in range(3):
    mean, std = _moments(x[labels == k])
    np.testing.assert_allclose(mean, MEANS[k], atol=0.03)
    np.testing.assert_allclose(std, 0.3, atol=0.03)


# --- Scale sweeps and the one-pass fast path -----------------------------------------------

def test_guidance_scale_sweep_equals_separate_calls():
  scales = np.array([0.0, 1.0, 2.5, -0.5], np.float32)
  kw = dict(image_shape=(2,), num_steps=10, null_label=NULL, eta=0.3,
            classifier_fn=ORACLE.logits, classifier_scale=0.5)
  swept = sampling.sample(jax.random.key(6), ORACLE.eps, SCHEDULE, [0, 1, 3], guidance_scale=scales,
                          **kw)
  assert swept.shape == (4, 3, 2)
  for i, scale in enumerate(scales):  # 0 and 1 take the one-pass paths
    one = sampling.sample(jax.random.key(6), ORACLE.eps, SCHEDULE, [0, 1, 3],
                          guidance_scale=float(scale), **kw)
    np.testing.assert_allclose(swept[i], one, rtol=1e-5, atol=1e-5)


def _counting(calls):
  def eps_fn(x, t, y):
    calls.append(x.shape[0])  # runs at trace time only
    return ORACLE.eps(x, t, y)
  return eps_fn


@pytest.mark.parametrize("scale,batches", [(0.0, [3]), (1.0, [3]), (2.0, [6]),
                                           (np.array([0.0, 1.0]), [6])])
def test_fast_path_runs_only_the_passes_it_needs(scale, batches):
  calls, classifier_calls = [], []

  def logits(x, t):
    classifier_calls.append(x.shape[0])
    return ORACLE.logits(x, t)

  kw = dict(image_shape=(2,), num_steps=4, null_label=NULL, classifier_fn=logits,
            classifier_scale=1.0)
  fast = sampling.sample(jax.random.key(7), _counting(calls), SCHEDULE, [0, 1, 2],
                         guidance_scale=scale, **kw)
  assert calls == batches  # one B-sized pass at γ = 0 or 1, one 2B pass otherwise
  assert classifier_calls == [3]  # one forward (and its backward) per step
  if np.ndim(scale) == 0:  # the same numbers as the two-pass program, swept
    both = sampling.sample(jax.random.key(7), ORACLE.eps, SCHEDULE, [0, 1, 2],
                           guidance_scale=np.array([scale, 2.0]), **kw)
    np.testing.assert_allclose(fast, both[0], rtol=1e-5, atol=1e-5)


def test_traced_scale_uses_the_two_pass_program():
  calls = []
  eps_fn = _counting(calls)
  draw = jax.jit(lambda scale: sampling.sample(jax.random.key(0), eps_fn, SCHEDULE, [0, 1],
                                               image_shape=(2,), num_steps=4, null_label=NULL,
                                               guidance_scale=scale))
  draw(0.0)
  draw(1.0)
  assert calls == [4]  # traced once, with the batched 2B pass


def test_fast_paths_compile_once_per_case(monkeypatch):
  ref.install_trace_counter(monkeypatch, n=3)  # γ = 0, γ = 1 and the rest
  kw = dict(image_shape=(2,), num_steps=4, null_label=NULL)
  for scale in (0.0, 1.0, 2.0, 0, 1, 3.0, -2.0):
    sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE, [0, 1], guidance_scale=scale, **kw)


@pytest.mark.parametrize("method", ["ddim", "ddpm", "dpmpp_2m"])
def test_dynamic_thresholding_keeps_x0_in_range_and_matches_reference(method):
  x_T = (_x_T() * 3).astype(np.float32)
  key = jax.random.key(8)
  out = sampling.sample(key, _eps_jax, DIFF_SCHEDULE, [0, 0, 0], x_init=x_T, method=method,
                        num_steps=10, dynamic_threshold=0.9, timestep_spacing="trailing")
  ts = ref.diffusers_timesteps(T, 10, "trailing")
  if method == "ddpm":
    _, loop_key = jax.random.split(key)
    noises = [np.asarray(jax.random.normal(jax.random.fold_in(loop_key, t), (3, 4)))
              for t in ts]
    want = ref.ddpm(x_T, ts, DIFF_ABAR, _np_step, noises, p=0.9)
  else:
    want = (ref.ddim if method == "ddim" else ref.dpmpp_2m)(x_T, ts, DIFF_ABAR, _np_step, p=0.9)
  np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(out)).max() <= 1.0 + 1e-6
