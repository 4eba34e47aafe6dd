"""Test set-up: eight host CPU devices, so data-parallel code is exercised without a GPU."""

import contextlib
import importlib.util
import os

from tests.helpers import TEST_XLA_FLAGS

# Must be set before JAX initialises its backends.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
     TEST_XLA_FLAGS]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest

LOCKING = importlib.util.find_spec("filelock") is not None
if LOCKING:
  import filelock


@pytest.hookimpl(trylast=True)  # after pytest's own configure has made its temporary folders
def pytest_configure(config):
  """Per-run folders under pytest's base temporary folder, which pytest prunes (it keeps the
  last three runs'), so repeated runs do not fill the temporary folder.

  - Data sets are prepared into a fresh folder (subprocesses inherit it), so tests never
    read or write the user's ~/tensorflow_datasets.
  - The entry points the tests start keep no compiled programs in the user's cache; instead
    this process and every CLI it starts share one cache for the run, since the suite
    compiles the same small train steps and samplers many times over. The pytest-xdist
    workers of one run share it too (a worker's base folder is inside the run's). A size
    limit makes JAX lock the cache around each read and write, so no process reads an
    entry another is writing (the kill -9 test, which could leave one half-written, keeps
    a cache of its own). Without filelock, which the lock needs, each worker keeps its own.
    The tiny trained workdir is shared alike (`tiny_workdir`).

  These must be set before JAX is imported, which the test modules do when collected.
  """
  base = config._tmp_path_factory.getbasetemp()  # pylint: disable=protected-access
  os.environ["TFDS_DATA_DIR"] = str(base / "tensorflow_datasets")
  jit_cache = _run_folder(base) / "jit_cache"
  jit_cache.mkdir(exist_ok=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(jit_cache)
  os.environ["CFG_JAX_COMPILATION_CACHE"] = "0"
  if LOCKING:
    os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(8 << 30)  # never reached: for the lock


def _run_folder(base):
  """The folder every process of this run shares: the run's own when pytest-xdist runs it
  (a worker's base folder is inside it) and filelock can guard it, else this process's."""
  return base.parent if LOCKING and os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker per core, at most 4 (PYTEST_XDIST_AUTO_NUM_WORKERS overrides). A
  worker is a JAX process whose compiles run mostly on one core."""
  if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
    return None  # xdist's own hook reads it
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return max(1, min(cores or 1, 4))


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
  """A workdir trained by `train.py` on the tiny config (diffusion model and classifier),
  trained once per run: the first worker to need it trains it while the others wait on its
  lock. Tests only read it; one that trains in it works on a copy."""
  from tests.helpers import TINY_CONFIG, run_cli

  folder = _run_folder(tmp_path_factory.getbasetemp()) / "tiny_workdir"
  work = folder / "run"
  trained, failed = folder / "trained", folder / "failed"  # marks outside the workdir
  folder.mkdir(exist_ok=True)
  with (filelock.FileLock(str(folder / "lock")) if LOCKING else contextlib.nullcontext()):
    if not trained.exists() and not failed.exists():
      result = run_cli("train.py", "--config", TINY_CONFIG, "--workdir", work)
      (trained if result.returncode == 0 else failed).write_text(result.stderr[-3000:])
  assert not failed.exists(), failed.read_text()  # once, not once per worker
  return work
