import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfg_jax import diffusion, schedules


def test_q_sample_formula_and_inverse():
  s = schedules.cosine(1000)
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal((4, 3, 3, 2)).astype(np.float32)
  noise = rng.standard_normal(x0.shape).astype(np.float32)
  t = np.array([0, 10, 500, 999])
  x_t = diffusion.q_sample(s, x0, t, noise)
  # Against float64 (below t = 999, where β is capped): the schedule's tables keep
  # sqrt(1 − ᾱ) exact even at t = 0.
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  abar = np.array([f((k + 1) / 1000) / f(0) for k in t[:3]])[:, None, None, None]
  np.testing.assert_allclose(x_t[:3], np.sqrt(abar) * x0[:3] + np.sqrt(1 - abar) * noise[:3],
                             rtol=2e-6, atol=1e-7)
  # x0 is ill-conditioned at t = 999 (ᾱ ≈ 4e-5), so check the inverse below it.
  np.testing.assert_allclose(diffusion.predict_x0_from_eps(s, x_t[:3], t[:3], noise[:3]),
                             x0[:3], atol=2e-3)
  np.testing.assert_allclose(diffusion.predict_eps_from_x0(s, x_t, t, x0), noise, atol=2e-4)


def test_label_dropout_rate():
  labels = jnp.zeros((100_000,), jnp.int32)
  y, dropped = diffusion.drop_labels(jax.random.key(0), labels, 0.2, 10)
  assert float(jnp.mean(dropped)) == pytest.approx(0.2, abs=0.005)
  np.testing.assert_array_equal(np.asarray(y)[np.asarray(dropped)], 10)
  np.testing.assert_array_equal(np.asarray(y)[~np.asarray(dropped)], 0)


def test_loss_is_zero_for_the_exact_eps_and_sees_the_dropped_labels():
  """Data is one point c, so ε = (x_t − sqrt(ᾱ_t)·c)/sqrt(1 − ᾱ_t) exactly."""
  s = schedules.linear(1000)
  c = jnp.full((64, 2, 2, 1), 0.5)
  seen = {}

  def exact_eps(params, x_t, t, y):
    abar = s.alphas_cumprod[t][:, None, None, None]
    seen["y"] = y
    return (x_t - jnp.sqrt(abar) * params) / jnp.sqrt(1 - abar)

  loss, aux = jax.jit(
      lambda p, key: diffusion.cfg_loss(p, exact_eps, s, c, jnp.full((64,), 3), key,
                                        p_uncond=0.5, null_label=10)
  )(0.5, jax.random.key(1))
  assert float(loss) < 1e-6
  assert aux["per_example_loss"].shape == (64,)
  assert 0 <= int(aux["t"].min()) and int(aux["t"].max()) < 1000
  # A wrong guess of x0 gives a clearly non-zero loss.
  wrong, _ = diffusion.cfg_loss(0.0, exact_eps, s, c, jnp.full((64,), 3), jax.random.key(1),
                                p_uncond=0.5, null_label=10)
  assert float(wrong) > 1e-3
  dropped = np.asarray(aux["dropped"])
  assert 0 < dropped.sum() < 64
  # The network is called with the dropped labels: null where dropped, the label elsewhere.
  _, aux = diffusion.cfg_loss(0.5, exact_eps, s, c, jnp.full((64,), 3), jax.random.key(1),
                              p_uncond=0.5, null_label=10)
  np.testing.assert_array_equal(seen["y"], np.where(aux["dropped"], 10, 3))
  np.testing.assert_array_equal(aux["dropped"], dropped)  # same key, same drop


def test_min_snr_weighting_scales_each_example_by_min_snr_over_snr():
  """Hang et al.'s min-SNR-γ for ε-prediction: per-example ε-MSE × min(SNR_t, γ)/SNR_t."""
  s = schedules.get("cosine", 1000)
  x0 = jnp.zeros((256, 2, 2, 1))
  constant_error = lambda p, x_t, t, y: jnp.zeros_like(x_t) + p  # noqa: E731
  key = jax.random.key(3)
  plain, aux = diffusion.cfg_loss(0.0, constant_error, s, x0, jnp.zeros((256,), jnp.int32), key,
                                  p_uncond=0.1, null_label=10)
  weighted, waux = diffusion.cfg_loss(0.0, constant_error, s, x0, jnp.zeros((256,), jnp.int32),
                                      key, p_uncond=0.1, null_label=10, min_snr_gamma=5.0)
  abar = np.asarray(s.alphas_cumprod, np.float64)[np.asarray(aux["t"])]
  snr = abar / (1 - abar)
  np.testing.assert_allclose(waux["per_example_loss"],
                             aux["per_example_loss"] * np.minimum(snr, 5.0) / snr, rtol=3e-4)
  assert float(weighted) < float(plain)  # low-noise examples (SNR > 5) count less
  assert (snr > 5).any() and (snr < 5).any()
