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


def test_bad_arguments():
  with pytest.raises(ValueError, match="num_timesteps"):
    schedules.linear(0)
  with pytest.raises(ValueError, match="Unknown noise schedule"):
    schedules.get("quadratic")
