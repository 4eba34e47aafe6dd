"""Helpers for tests that run the command-line tools as a user would."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CONFIG = os.path.join(REPO, "configs", "digits_tiny.py")
# XLA flags of every JAX process the suite runs (but test_cpu_collectives.py's, which guards
# the optimised runtime). Its programs are small and compiled once, so LLVM's optimisations
# cost more time than they save: at level 0 a tiny main job's compiles take about half as
# long (benchmarks/PERF_FINDINGS.md). The tests that compare two runs give both the same flags.
TEST_XLA_FLAGS = os.environ.get("CFG_JAX_TEST_XLA_FLAGS", "--xla_backend_optimization_level=0")


def run_cli(*args, timeout=600):
  """Runs an entry point (train.py, sample.py, ...) in a subprocess, with the XLA flags it
  sets itself (cfg_jax.app.xla_flags) besides the suite's."""
  env = {**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS}
  return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                        cwd=REPO, env=env, timeout=timeout)


def assert_one_line_error(result, text):
  """Exit status 2, one `error:` line on stderr that contains `text`, no traceback."""
  assert result.returncode == 2, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and text in lines[0], result.stderr[-3000:]
  assert "Traceback" not in result.stderr


def saved_train_state(workdir, config):
  """The latest diffusion TrainState in `workdir/checkpoints`, read back from disk.

  (JAX is imported here, not at the top: tests/conftest.py imports this module before it
  sets the XLA flags.)"""
  from cfg_jax import checkpoints
  from cfg_jax.train import denoiser, loop

  _, params = denoiser.create_denoiser(config, 0)
  state = loop.init_state(params, loop.make_optimizer(**config.optimizer), with_ema=True)
  mngr = checkpoints.manager(os.path.join(workdir, "checkpoints"), create=False)
  return checkpoints.restore(mngr, checkpoints.restore_target(state))[0]
