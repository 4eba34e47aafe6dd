import math

import numpy as np
import pytest

from cfg_jax import schedules


def test_linear_matches_ho_et_al():
  s = schedules.linear(1000)
  betas = np.linspace(1e-4, 0.02, 1000)
  np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-6)
  assert s.alphas_cumprod.dtype == np.float32 and s.alphas_cumprod.shape == (1000,)
  assert s.num_timesteps == 1000
  np.testing.assert_allclose(s.betas, betas, rtol=2e-3, atol=1e-6)


def test_cosine_matches_nichol_dhariwal():
  T = 1000
  s = schedules.cosine(T)
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  # Away from the cap, ᾱ_t = f((t+1)/T) / f(0).
  for t in (0, 10, 500, 900):
    assert s.alphas_cumprod[t] == pytest.approx(f((t + 1) / T) / f(0), rel=1e-5)
  assert float(np.max(s.betas)) <= 0.999 + 1e-6
  assert np.all(np.diff(np.asarray(s.alphas_cumprod)) < 0)


@pytest.mark.parametrize("make", [schedules.linear, schedules.cosine])
def test_log_snr(make):
  s = make(100)
  abar = np.asarray(s.alphas_cumprod, np.float64)
  np.testing.assert_allclose(s.log_snr(), np.log(abar / (1 - abar)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(s.log_snr(np.array([3, 7])), s.log_snr()[np.array([3, 7])])
  assert np.all(np.diff(np.asarray(s.log_snr())) < 0)


@pytest.mark.parametrize("T", [20, 50, 250, 1000, 4000])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_every_named_schedule_ends_near_pure_noise(name, T):
  assert float(schedules.get(name, T).alphas_cumprod[-1]) < 1e-3


def test_linear_is_scaled_by_1000_over_T_like_guided_diffusion():
  betas = np.linspace(1e-4 * 4, 0.02 * 4, 250)  # guided-diffusion's scale = 1000 / T
  np.testing.assert_allclose(schedules.linear(250).alphas_cumprod, np.cumprod(1 - betas),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="num_timesteps >= 20"):
    schedules.linear(10)


def test_float64_tables():
  s = schedules.cosine(1000)
  abar = np.asarray(s.alphas_cumprod, np.float64)
  np.testing.assert_allclose(s.sqrt_alphas_cumprod, np.sqrt(abar), rtol=1e-6)
  f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
  exact = math.sqrt(1 - f(1 / 1000) / f(0))  # at t = 0 float32 1 − ᾱ loses ~1e-3
  assert float(s.sqrt_one_minus_alphas_cumprod[0]) == pytest.approx(exact, rel=1e-6)


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.linear(0)
  with pytest.raises(ValueError, match="Unknown noise schedule"):
    schedules.get("quadratic")
