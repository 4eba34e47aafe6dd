"""Guidance rules against float64 NumPy transcriptions and exact identities on Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from cfg_jax import guidance, sampling, schedules
from cfg_jax.sampling import loop
from tests import reference_samplers as ref
from tests.gaussian_oracle import GaussianClasses

SCHEDULE = schedules.linear(1000)
ABAR = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))  # float64, as the schedule's tables
MEANS = np.array([[0.6, -0.4], [-0.5, 0.5], [0.1, 0.7]])
ORACLE = GaussianClasses(SCHEDULE, MEANS, std=0.3)
NULL = ORACLE.num_classes

# A made-up, label- and time-dependent ε (and a weaker one), in NumPy and in JAX.
RNG = np.random.default_rng(0)
B, D = 5, 4
W = RNG.standard_normal((NULL + 1, D)) * 0.5
A = RNG.standard_normal((D, D)) * 0.3
A_WEAK = A * 0.5
C = RNG.standard_normal((3, D))
LABELS = np.array([0, 1, 2, 3, 1])  # one null label among them
X_T = (RNG.standard_normal((B, D)) * 1.5).astype(np.float32)


def eps_np(x, t, y, a=A):
  return np.tanh(x @ a + W[y] * (1 + t / 1000))


def eps_jax(x, t, y, a=A):
  return jnp.tanh(x @ jnp.asarray(a) + jnp.asarray(W)[y] * (1 + t[:, None] / 1000))


def logits_jax(x, t):
  return jnp.sin(x @ C.T) * (1 + t[:, None] / 1000)


def grad_np(x, t, y=LABELS):
  """s = 1 classifier gradient of logits_jax, by hand; the null label gets none."""
  z = np.sin(x @ C.T) * (1 + t / 1000)
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dz = (np.eye(3)[np.minimum(y, 2)] - p) * (1 + t / 1000)
  return ((dz * np.cos(x @ C.T)) @ C) * (y < 3)[:, None]


def _passes_np(x, t):
  return eps_np(x, t, LABELS), eps_np(x, t, np.full_like(LABELS, NULL))


def _np_rule(name):
  """The NumPy eps_step(x, t, state) -> (ε̂, ε̂_direction, state) of each case."""
  def plain(**kw):
    def step(x, t, state):
      e = ref.cfg(*_passes_np(x, t), t, ABAR[t], 1000, **kw)
      return e, e, state
    return step

  if name.startswith("apg"):
    kw = CASES[name][1]

    def step(x, t, m):
      m = np.zeros_like(x) if m is None else m
      e, m = ref.apg(x, ABAR[t], *_passes_np(x, t), m, **kw)
      return e, e, m
    return step
  if name.startswith("cfgpp"):
    def step(x, t, state):
      c, u = _passes_np(x, t)
      return u + 0.6 * (c - u), u, state
    return step
  if name == "autoguidance":
    def step(x, t, state):
      main, weak = eps_np(x, t, LABELS), eps_np(x, t, LABELS, A_WEAK)
      e = weak + 2.0 * (main - weak)
      return e, e, state
    return step
  return plain(**CASES[name][1])


CASES = {
    "interval": (guidance.CFG(2.5, interval=(0.5, 3.0)), dict(scale=2.5, interval=(0.5, 3.0))),
    "linear": (guidance.CFG(2.5, weight_schedule="linear"),
               dict(scale=2.5, weight_schedule="linear")),
    "cosine": (guidance.CFG(2.5, weight_schedule="cosine"),
               dict(scale=2.5, weight_schedule="cosine")),
    "rescale": (guidance.CFG(2.5, rescale=0.7), dict(scale=2.5, rescale=0.7)),
    "cfg_all": (guidance.CFG(3.0, interval=(0.2, 5.0), weight_schedule="cosine", rescale=0.5),
                dict(scale=3.0, interval=(0.2, 5.0), weight_schedule="cosine", rescale=0.5)),
    "apg": (guidance.APG(3.0), dict(scale=3.0, eta=0.0, momentum=0.0, norm_threshold=0.0)),
    "apg_full": (guidance.APG(3.0, eta=0.3, momentum=-0.5, norm_threshold=1.0),
                 dict(scale=3.0, eta=0.3, momentum=-0.5, norm_threshold=1.0)),
    "cfgpp": (guidance.CFGPlusPlus(0.6), None),
    "cfgpp_clip_classifier": (guidance.CFGPlusPlus(0.6), None),
    "autoguidance": (guidance.Autoguidance(2.0, Partial(eps_jax, a=A_WEAK)), None),
}


def _reference_sample(method, key, ts, step, *, clip=False, p=None, grad=None):
  """The NumPy reference of `method` from X_T over `ts`; DDPM with the step noise the sampler
  draws from `key` (`fold_in(loop_key, t)`)."""
  if method == "ddim":
    return ref.ddim(X_T, ts, ABAR, step, clip=clip, p=p, grad=grad)
  if method == "dpmpp_2m":
    return ref.dpmpp_2m(X_T, ts, ABAR, step, clip=clip, p=p, grad=grad)
  assert grad is None, "the DDPM reference takes no classifier gradient"
  _, loop_key = jax.random.split(key)
  noises = [np.asarray(jax.random.normal(jax.random.fold_in(loop_key, t), (B, D))) for t in ts]
  return ref.ddpm(X_T, ts, ABAR, step, noises, clip=clip, p=p)


@pytest.mark.parametrize("name,method,clip,p,classifier", [
    ("interval", "ddim", False, None, False),
    ("linear", "ddim", False, None, False),
    ("cosine", "ddim", True, None, True),
    ("rescale", "ddim", False, 0.9, False),
    ("cfg_all", "dpmpp_2m", False, None, True),
    ("apg", "ddim", False, None, False),
    ("apg_full", "ddim", False, None, False),
    ("apg_full", "dpmpp_2m", True, None, False),
    ("rescale", "ddpm", False, 0.8, False),
    ("cfgpp", "ddim", False, None, False),
    ("cfgpp_clip_classifier", "ddim", True, None, True),
    ("autoguidance", "ddim", False, None, False),
    ("autoguidance", "dpmpp_2m", False, 0.95, False),
])
def test_rule_matches_numpy_reference_step_by_step(name, method, clip, p, classifier):
  num_steps, s = 10, 0.8
  rule = CASES[name][0]
  key = jax.random.key(3)
  out = sampling.sample(key, eps_jax, SCHEDULE, LABELS, x_init=X_T, method=method,
                        num_steps=num_steps, clip_denoised=clip, dynamic_threshold=p,
                        guidance=rule, null_label=NULL,
                        classifier_fn=logits_jax if classifier else None,
                        classifier_scale=s if classifier else 0.0)
  ts = ref.diffusers_timesteps(1000, num_steps, "leading", multistep=method == "dpmpp_2m")
  step = _np_rule(name)
  grad = (lambda x, t: s * grad_np(x, t)) if classifier else None
  want = _reference_sample(method, key, ts, step, clip=clip, p=p, grad=grad)
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-4)


def _oracle_sample(rule, **kw):
  kw = dict(x_init=X_T[:, :2], num_steps=20, clip_denoised=False, null_label=NULL) | kw
  return np.asarray(sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE, LABELS, **kw,
                                    guidance=rule))


def test_exact_identities_between_rules_on_gaussian_data():
  """APG with η = 1 and no momentum or cap is CFG; autoguidance with the unconditional model
  as the weak one is CFG; an interval holding every σ is CFG, one holding none is γ = 1."""
  plain = _oracle_sample(guidance.CFG(2.5))
  np.testing.assert_allclose(_oracle_sample(guidance.APG(2.5, eta=1.0)), plain, atol=2e-5)
  uncond = Partial(lambda x, t, y: ORACLE.eps_uncond(x, t))
  np.testing.assert_allclose(_oracle_sample(guidance.Autoguidance(2.5, uncond)), plain,
                             atol=2e-5)
  np.testing.assert_allclose(_oracle_sample(guidance.CFG(2.5, interval=(0.0, np.inf))), plain,
                             atol=1e-6)
  np.testing.assert_allclose(_oracle_sample(guidance.CFG(2.5, interval=(1e3, 2e3))),
                             _oracle_sample(guidance.CFG(1.0)), atol=1e-6)
  # CFG++ at λ = 1 with DDIM renoises with ε_u; at λ = 0 it is the unconditional sampler.
  np.testing.assert_allclose(_oracle_sample(guidance.CFGPlusPlus(0.0)),
                             _oracle_sample(guidance.CFG(0.0)), atol=1e-6)


def test_apg_shrinks_the_update_against_cfg_on_gaussian_data():
  """At a large scale APG (η = 0, capped) stays nearer the class than CFG overshoots."""
  labels = np.zeros(64, int)
  kw = dict(image_shape=(2,), num_steps=20, clip_denoised=False, null_label=NULL)
  cfg = sampling.sample(jax.random.key(1), ORACLE.eps, SCHEDULE, labels, guidance_scale=8.0,
                        **kw)
  apg = sampling.sample(jax.random.key(1), ORACLE.eps, SCHEDULE, labels,
                        guidance=guidance.APG(8.0, norm_threshold=1.0), **kw)
  dist = lambda x: float(np.linalg.norm(np.asarray(x).mean(0) - MEANS[0]))
  assert dist(apg) < dist(cfg)


@pytest.mark.parametrize("rule", [
    guidance.CFG(jnp.array([0.0, 1.0, 2.5]), interval=(0.3, 4.0), rescale=0.5),
    guidance.APG(jnp.array([1.0, 4.0]), eta=0.2, momentum=-0.5, norm_threshold=2.0),
    guidance.CFGPlusPlus(jnp.array([0.2, 0.8])),
    guidance.Autoguidance(jnp.array([1.5, 3.0]), Partial(eps_jax, a=A_WEAK)),
    guidance.CFG(jnp.array([0.0, 2.5]), uncond_eps_fn=Partial(eps_jax, a=A_WEAK)),
    guidance.CFGZeroStar(jnp.array([1.5, 3.0]), zero_init_steps=2),
    guidance.IndependentCondition(jnp.array([1.5, 3.0])),
])
def test_scale_sweep_equals_separate_calls(rule):
  kw = dict(image_shape=(D,), num_steps=5, null_label=NULL, num_classes=NULL, eta=0.5)
  swept = sampling.sample(jax.random.key(2), eps_jax, SCHEDULE, LABELS, guidance=rule, **kw)
  assert swept.shape == (len(rule.scale), B, D)
  for i, scale in enumerate(np.asarray(rule.scale)):
    one = sampling.sample(jax.random.key(2), eps_jax, SCHEDULE, LABELS,
                          guidance=rule.replace(scale=float(scale)), **kw)
    np.testing.assert_allclose(swept[i], one, rtol=1e-5, atol=1e-5)


def test_no_numeric_field_of_a_rule_recompiles(monkeypatch):
  ref.install_trace_counter(monkeypatch, n=7)  # one program per kind of rule below
  kw = dict(image_shape=(D,), num_steps=4, null_label=NULL, num_classes=NULL, method="ddim")
  weak_params = [A_WEAK, A_WEAK * 2]
  weak = lambda x, t, y, a: eps_jax(x, t, y, a)
  for i in range(2):
    for rule in [
        guidance.CFG(2.0 + i, interval=(0.1 * (i + 1), 3.0 + i), rescale=0.3 * i),
        guidance.APG(2.0 + i, eta=0.5 * i, momentum=-0.5 * i, norm_threshold=float(i)),
        guidance.CFGPlusPlus(0.3 + 0.5 * i),
        guidance.Autoguidance(2.0 + i, Partial(weak, a=jnp.asarray(weak_params[i]))),
        guidance.CFG(2.0 + i, uncond_eps_fn=Partial(weak, a=jnp.asarray(weak_params[i]))),
        guidance.CFGZeroStar(2.0 + i, zero_init_steps=i),
        guidance.IndependentCondition(2.0 + i),
    ]:
      sampling.sample(jax.random.key(i), eps_jax, SCHEDULE, LABELS, guidance=rule,
                      dynamic_threshold=0.9 + 0.05 * i, eta=0.1 * i, **kw)


@pytest.mark.parametrize("make,message", [
    (lambda: guidance.CFG(2.0, interval=(1.0, 0.5)), "0 <= sigma_lo < sigma_hi"),
    (lambda: guidance.CFG(2.0, interval=(-1.0, 0.5)), "0 <= sigma_lo < sigma_hi"),
    (lambda: guidance.CFG(2.0, interval=(1.0,)), r"interval must be \(sigma_lo, sigma_hi\)"),
    (lambda: guidance.CFG(2.0, weight_schedule="square"), "Unknown weight_schedule"),
    (lambda: guidance.CFG(2.0, rescale=1.5), r"rescale must be a finite scalar in \[0, 1\]"),
    (lambda: guidance.CFG(np.ones((2, 2))), "1-D array of scales"),
    (lambda: guidance.CFG(float("nan")), "CFG scale must be"),
    (lambda: guidance.APG(2.0, eta=float("inf")), "APG eta must be a finite scalar"),
    (lambda: guidance.APG(2.0, momentum=[0.1, 0.2]), "APG momentum must be a finite scalar"),
    (lambda: guidance.CFGPlusPlus(1.5), r"CFGPlusPlus scale must be .* in \[0, 1\]"),
    (lambda: guidance.Autoguidance(2.0, weak_eps_fn=3), "weak_eps_fn must be callable"),
    (lambda: guidance.CFG(2.0, uncond_eps_fn="net"), "CFG uncond_eps_fn must be callable"),
    (lambda: guidance.CFGZeroStar(2.0, zero_init_steps=-1),
     "zero_init_steps must be a non-negative integer, got -1"),
    (lambda: guidance.CFGZeroStar(2.0, zero_init_steps=1.5), "non-negative integer, got 1.5"),
    (lambda: guidance.CFGZeroStar([[2.0]]), "CFGZeroStar scale must be"),
    (lambda: guidance.IndependentCondition(2.0, num_classes=0),
     "num_classes must be a positive int"),
])
def test_bad_rule_fields_raise_one_line_errors(make, message):
  with pytest.raises(ValueError, match=message) as info:
    make()
  assert "\n" not in str(info.value)


def test_rules_that_cannot_sample_raise_one_line_errors():
  kw = dict(image_shape=(D,), num_steps=4)
  cases = [
      (dict(guidance=guidance.IndependentCondition(2.0), null_label=NULL),
       "IndependentCondition needs num_classes"),
      (dict(guidance=guidance.IndependentCondition(2.0, num_classes=2), num_classes=NULL,
            null_label=NULL), "num_classes=2 differs from the model's num_classes=3"),
      (dict(guidance=guidance.CFGZeroStar(2.0, zero_init_steps=4), null_label=NULL),
       "zero_init_steps=4 would hold x_T through all num_steps=4 steps"),
      (dict(guidance=guidance.CFGZeroStar(2.0)), "CFGZeroStar needs null_label"),
  ]
  for options, message in cases:
    with pytest.raises(ValueError, match=message) as info:
      sampling.sample(jax.random.key(0), eps_jax, SCHEDULE, LABELS[:4] % NULL, **kw, **options)
    assert "\n" not in str(info.value)


def test_cfg_without_a_null_label_names_the_rules_that_need_none():
  with pytest.raises(ValueError, match="guidance_scale=3.0 needs null_label") as info:
    sampling.sample(jax.random.key(0), eps_jax, SCHEDULE, [0, 1], image_shape=(D,),
                    guidance_scale=3.0)
  message = str(info.value)
  assert "IndependentCondition (sample.py --guidance icg)" in message
  assert "guidance.CFG(uncond_eps_fn=...)" in message and "\n" not in message


def test_step_context_sigma_uses_the_float64_tables():
  """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t): near t = 0, 1 − ᾱ in float32 would be off by 3e-4."""
  t = jnp.array([0, 1, 2, 10, 500, 999])
  ctx = guidance.StepContext(SCHEDULE, jnp.zeros((len(t), D)), t)
  want = np.sqrt((1 - ABAR[np.asarray(t)]) / ABAR[np.asarray(t)])
  np.testing.assert_allclose(ctx.sigma, want, rtol=1e-6)


# -- CFG-Zero* --------------------------------------------------------------------------------

def _cfg_zero_star_np(eps_c, eps_u, scale):
  """Fan et al.'s ε̂ = s*·ε_u + γ(ε_c − s*·ε_u), s* = ⟨ε_c, ε_u⟩/(‖ε_u‖² + 1e-8), in float64."""
  c, u = (np.asarray(e, np.float64).reshape(len(e), -1) for e in (eps_c, eps_u))
  s = (c * u).sum(1) / ((u * u).sum(1) + 1e-8)
  s = s.reshape((-1,) + (1,) * (np.ndim(eps_u) - 1))
  return s * eps_u + scale * (eps_c - s * eps_u)


def _combine(rule, eps_c, eps_u):
  ctx = guidance.StepContext(SCHEDULE, jnp.zeros_like(eps_c), jnp.full((len(eps_c),), 500))
  eps, renoise, _ = rule.combine(ctx, jnp.asarray(eps_c), jnp.asarray(eps_u), ())
  np.testing.assert_array_equal(eps, renoise)
  return np.asarray(eps)


def test_cfg_zero_star_combine_matches_the_formula_per_example():
  rng = np.random.default_rng(1)
  eps_c, eps_u = (rng.standard_normal((3, 4, 4, 2)).astype(np.float32) for _ in range(2))
  eps_u[1] = 0.0  # ‖ε_u‖² = 0: s* = 0, ε̂ = γ·ε_c
  got = _combine(guidance.CFGZeroStar(2.5), eps_c, eps_u)
  np.testing.assert_allclose(got, _cfg_zero_star_np(eps_c, eps_u, 2.5), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], 2.5 * eps_c[1], rtol=1e-6)


def test_cfg_zero_star_is_cfg_where_the_optimized_scale_is_one():
  """s* = 1 exactly where ε_c − ε_u ⊥ ε_u (up to the 1e-8); elsewhere it is not CFG."""
  rng = np.random.default_rng(2)
  eps_u, d = (rng.standard_normal((3, 8)) for _ in range(2))
  d -= ((d * eps_u).sum(1, keepdims=True) / (eps_u * eps_u).sum(1, keepdims=True)) * eps_u
  eps_u, d = eps_u.astype(np.float32), d.astype(np.float32)
  cfg = _combine(guidance.CFG(2.5), eps_u + d, eps_u)
  np.testing.assert_allclose(_combine(guidance.CFGZeroStar(2.5), eps_u + d, eps_u), cfg,
                             atol=1e-5)
  tilted = eps_u + d + 0.5 * eps_u  # s* = 1.5
  assert np.abs(_combine(guidance.CFGZeroStar(2.5), tilted, eps_u)
                - _combine(guidance.CFG(2.5), tilted, eps_u)).max() > 0.1


@pytest.mark.parametrize("method,clip,classifier", [
    ("ddim", False, False),
    ("ddim", True, True),
    ("ddpm", False, False),
    ("dpmpp_2m", False, False),
])
def test_cfg_zero_star_holds_x_for_its_first_steps_then_samples_as_if_started_there(
    method, clip, classifier):
  """Zero-init K: x_T is left as it is by the first K visited steps, and the rest sample
  from it as a sampler on the remaining timesteps would (DPM-Solver++ restarts first order)."""
  num_steps, k, s = 8, 3, 0.8
  key = jax.random.key(4)
  out = sampling.sample(key, eps_jax, SCHEDULE, LABELS, x_init=X_T, method=method,
                        num_steps=num_steps, clip_denoised=clip, null_label=NULL,
                        guidance=guidance.CFGZeroStar(2.5, zero_init_steps=k),
                        classifier_fn=logits_jax if classifier else None,
                        classifier_scale=s if classifier else 0.0)
  ts = ref.diffusers_timesteps(1000, num_steps, "leading", multistep=method == "dpmpp_2m")[k:]

  def step(x, t, state):
    e = _cfg_zero_star_np(*_passes_np(x, t), 2.5)
    return e, e, state

  grad = (lambda x, t: s * grad_np(x, t)) if classifier else None
  want = _reference_sample(method, key, ts, step, clip=clip, grad=grad)
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-4)


def test_cfg_zero_star_at_scale_one_is_the_conditional_model():
  np.testing.assert_allclose(_oracle_sample(guidance.CFGZeroStar(1.0)),
                             _oracle_sample(guidance.CFG(1.0)), atol=1e-5)


# -- a separate unconditional network ---------------------------------------------------------

def test_separate_unconditional_network_is_cfg_also_on_a_model_without_a_null_label():
  """With the model itself at ∅ as the separate network, CFG is plain CFG, whether or not
  the model has a null label; at γ = 0 it samples with the separate network alone."""
  labels = np.array([0, 1, 2, 0, 1])
  at_null = Partial(lambda x, t, y: ORACLE.eps(x, t, jnp.full_like(y, NULL)))
  kw = dict(x_init=X_T[:, :2], num_steps=20, clip_denoised=False)
  draw = lambda **options: np.asarray(sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE,
                                                      labels, **kw, **options))
  plain = draw(guidance=guidance.CFG(2.5, rescale=0.5), null_label=NULL)
  for null_label in (NULL, None):
    separate = draw(guidance=guidance.CFG(2.5, rescale=0.5, uncond_eps_fn=at_null),
                    null_label=null_label)
    # Float rounding only: one batched pass against two separate ones, over 20 steps (up to
    # 1.3e-6 apart on the newest stack compiled at XLA's optimisation level 0).
    np.testing.assert_allclose(separate, plain, atol=1e-5)
  other = Partial(lambda x, t, y: 0.5 * ORACLE.eps_uncond(x, t))
  np.testing.assert_allclose(draw(guidance=guidance.CFG(0.0, uncond_eps_fn=other),
                                  null_label=NULL),
                             np.asarray(sampling.sample(jax.random.key(0), other, SCHEDULE,
                                                        labels, **kw)), atol=1e-6)


# -- independent condition guidance -----------------------------------------------------------

def test_icg_labels_are_uniform_independent_of_y_and_drawn_anew_per_step():
  rule = guidance.IndependentCondition(2.0, num_classes=3)
  key = jax.random.key(0)
  n = 3000
  step_key = loop.rule_key(key, 500, 1000)
  drawn = np.asarray(rule.guide_labels(step_key, jnp.zeros(n, jnp.int32)))
  # The labels are not looked at: any y gets the same draw.
  np.testing.assert_array_equal(
      drawn, rule.guide_labels(step_key, jnp.arange(n, dtype=jnp.int32) % 3))
  counts = np.bincount(drawn, minlength=4)
  assert counts[3] == 0  # never the null label
  chi2 = np.sum((counts[:3] - n / 3) ** 2 / (n / 3))
  assert chi2 < 13.8  # uniform (χ² with 2 degrees of freedom, p = 0.001)
  next_step = np.asarray(rule.guide_labels(loop.rule_key(key, 499, 1000),
                                           jnp.zeros(n, jnp.int32)))
  assert abs(np.mean(drawn == next_step) - 1 / 3) < 0.05  # another step draws anew
  _, loop_key = jax.random.split(key)
  noise_key = jax.random.fold_in(loop_key, 500)
  assert not np.array_equal(jax.random.key_data(step_key), jax.random.key_data(noise_key))
  # An example with the null label is its own guide: no guidance, as CFG gives it.
  mixed = np.asarray(rule.guide_labels(step_key, jnp.array([3, 0, 3, 1]), null_label=3))
  assert mixed[0] == mixed[2] == 3 and np.all(mixed[[1, 3]] < 3)


@pytest.mark.parametrize("method", ["ddim", "ddpm", "dpmpp_2m"])
def test_icg_matches_numpy_reference_with_the_same_labels(method):
  num_steps, key = 8, jax.random.key(5)
  rule = guidance.IndependentCondition(2.5)
  out = sampling.sample(key, eps_jax, SCHEDULE, LABELS, x_init=X_T, method=method,
                        num_steps=num_steps, clip_denoised=False, guidance=rule,
                        null_label=NULL, num_classes=NULL)
  filled = rule.replace(num_classes=NULL)

  def step(x, t, state):
    guide = np.asarray(filled.guide_labels(loop.rule_key(key, t, 1000),
                                           jnp.asarray(LABELS, jnp.int32), NULL))
    c, g = eps_np(x, t, LABELS), eps_np(x, t, guide)
    e = g + 2.5 * (c - g)
    return e, e, state

  ts = ref.diffusers_timesteps(1000, num_steps, "leading", multistep=method == "dpmpp_2m")
  want = _reference_sample(method, key, ts, step)
  np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-4)


def test_icg_guides_a_model_without_a_null_label():
  """The same samples whether the model has a null label or not (no label here is ∅), and
  guided: unlike the conditional model's."""
  labels = np.array([0, 1, 2, 0, 1])
  kw = dict(x_init=X_T, num_steps=6, num_classes=NULL)
  draw = lambda **options: np.asarray(sampling.sample(jax.random.key(0), eps_jax, SCHEDULE,
                                                      labels, **kw, **options))
  rule = guidance.IndependentCondition(3.0)
  without = draw(guidance=rule)
  np.testing.assert_allclose(without, draw(guidance=rule, null_label=NULL), atol=1e-6)
  assert np.abs(without - draw(guidance_scale=1.0)).max() > 0.1
