"""Test set-up: eight host CPU devices, so data-parallel code is exercised without a GPU."""

import os

# Must be set before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import tempfile

# The entry points the tests start keep no compiled programs in the user's cache; instead
# this process and every CLI it starts share one cache for the session, since the suite
# compiles the same small train steps and samplers many times over.
os.environ["CFG_JAX_COMPILATION_CACHE"] = "0"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="cfg_jax_jit_"))

import pytest

# Data sets are prepared into a fresh folder per test session (subprocesses inherit it),
# so tests never read or write the user's ~/tensorflow_datasets.
os.environ["TFDS_DATA_DIR"] = tempfile.mkdtemp(prefix="cfg_jax_tfds_")


@pytest.fixture(scope="session")
def digits_train():
  from cfg_jax import data

  return data.load_split("digits", "train")


@pytest.fixture
def tiny_config():
  from configs import digits_tiny

  return digits_tiny.get_config()


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A workdir trained by `train.py` on the tiny config (diffusion model and classifier)."""
  work = tmp_path_factory.mktemp("e2e") / "run"
  from tests.helpers import TINY_CONFIG, run_cli

  result = run_cli("train.py", "--config", TINY_CONFIG, "--workdir", work)
  assert result.returncode == 0, result.stderr[-3000:]
  return work
