"""benchmarks/recipe_table.py's own pieces: KID, pixel FID, the seed-spread verdict and the
recipe overrides (seconds; the script itself is checked with `--quick`)."""

import importlib
import pathlib
import sys

import numpy as np
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def recipe_table():
  sys.path.insert(0, str(BENCHMARKS))  # the script imports its sibling `machine`
  try:
    return importlib.import_module("recipe_table")
  finally:
    sys.path.remove(str(BENCHMARKS))


def _kid_by_loops(x, y):
  """The unbiased MMD² of Bińkowski et al. 2018, term by term."""
  d = x.shape[1]
  k = lambda a, b: (a @ b / d + 1) ** 3
  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return xx + yy - 2 * xy


def test_kid_matches_its_definition_and_is_unbiased(recipe_table):
  rng = np.random.default_rng(0)
  x, y = rng.standard_normal((12, 3)), rng.standard_normal((9, 3)) + 0.5
  assert recipe_table.kid(x, y) == pytest.approx(_kid_by_loops(x, y), rel=1e-10)
  # Two samples of one distribution: about 0 (either sign), far below a shifted one's.
  same = recipe_table.kid(rng.standard_normal((2000, 4)), rng.standard_normal((2000, 4)))
  shifted = recipe_table.kid(rng.standard_normal((2000, 4)), rng.standard_normal((2000, 4)) + 1)
  assert abs(same) < 0.02 < shifted


def test_pixel_fid_is_zero_for_the_same_images_and_grows_with_a_shift(recipe_table):
  rng = np.random.default_rng(1)
  real = rng.integers(0, 200, (500, 8, 8, 1), dtype=np.uint8)
  assert recipe_table.pixel_fid(real, real) == pytest.approx(0, abs=1e-6)
  # +51 levels is +0.4 in [−1, 1] on each of 64 pixels: |Δμ|² = 64 · 0.4².
  assert recipe_table.pixel_fid(real, real + 51) == pytest.approx(64 * 0.4 ** 2, rel=1e-6)


@pytest.mark.parametrize("base, cand, sign, mark", [
    ([0.90, 0.92], [0.85, 0.89], +1, "✗"),  # accuracy: every candidate seed lower
    ([0.90, 0.92], [0.91, 0.95], +1, ""),  # ranges overlap
    ([0.90, 0.92], [0.93, 0.95], +1, "✓"),
    ([13.0, 14.0], [14.5, 15.0], -1, "✗"),  # FID: every candidate seed higher
    ([13.0, 14.0], [12.0, 13.5], -1, ""),
    ([13.0, 14.0], [11.0, 12.5], -1, "✓"),
])
def test_verdict_marks_only_differences_beyond_the_seed_spread(recipe_table, base, cand, sign,
                                                              mark):
  spread = recipe_table.spread
  assert recipe_table.verdict(spread(base), spread(cand), sign) == mark


def test_overrides_are_checked_and_resolved_as_train_py_does(recipe_table):
  from cfg_jax import errors

  assert recipe_table.normalize_override("--config.train.num_steps=7") == "train.num_steps=7"
  with pytest.raises(errors.InputError):
    recipe_table.normalize_override("train.num_steps")
  config_file = str(BENCHMARKS.parent / "configs" / "digits_tiny.py")
  config = recipe_table.resolve_config(config_file, ["train.num_steps=7"])
  assert config.train.num_steps == 7 and config.model.base_channels == 8
  for bad in ("train.no_such_field=1", "train.num_steps=many"):
    with pytest.raises(errors.ConfigError):
      recipe_table.resolve_config(config_file, [bad])
