"""A real multi-process run on this machine: 2 processes × 2 CPU devices, over gloo.

Trains the tiny config (checkpoint at step 2, resume to 4) and samples, then compares with
1 process × 4 devices and 1 process × 1 device: losses and parameters to float tolerance,
samples identical.
"""

import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow
TIMEOUT_S = int(os.environ.get("CFG_JAX_MULTIHOST_TIMEOUT", 900))  # a loaded 2-core CI box


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(tmp_path, name, processes, devices_each):
  """Starts `processes` workers; returns [(Popen, log path)] and the result path."""
  workdir, out = tmp_path / name, tmp_path / f"{name}.npz"
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}
  for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(var, None)
  if processes > 1:
    env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{free_port()}",
               JAX_NUM_PROCESSES=str(processes))
  children = []
  for i in range(processes):
    log = tmp_path / f"{name}.{i}.log"
    # A persistent compilation cache per process: the resumed fit reuses the first compile.
    cache = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / f"jit-cache-{name}-{i}")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.multihost_worker", str(workdir), str(out)], cwd=REPO,
        env={**env, **cache, **({"JAX_PROCESS_ID": str(i)} if processes > 1 else {})},
        stdout=open(log, "w"), stderr=subprocess.STDOUT)
    children.append((proc, log))
  return children, out


def wait_all(children, timeout_s):
  """Waits for every child; kills them all on a timeout or on the first failure."""
  deadline = time.monotonic() + timeout_s
  try:
    for proc, log in children:
      rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
      assert rc == 0, f"{log} exited with {rc}:\n{open(log).read()[-4000:]}"
  except subprocess.TimeoutExpired:
    pytest.fail(f"timed out after {timeout_s} s; logs: {[str(l) for _, l in children]}")
  finally:
    for proc, _ in children:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_multihost_2x2_matches_one_process(tmp_path):
  from cfg_jax import data

  data.load_split("digits", "train")  # prepared once here; the workers only read it
  runs = {name: launch(tmp_path, name, p, d)
          for name, p, d in (("2x2", 2, 2), ("1x4", 1, 4), ("1x1", 1, 1))}
  wait_all([c for children, _ in runs.values() for c in children], TIMEOUT_S)
  results = {name: dict(np.load(out)) for name, (_, out) in runs.items()}
  assert (results["2x2"]["processes"], results["2x2"]["devices"]) == (2, 4)
  log = open(tmp_path / "2x2.1.log").read()
  assert "[process 1/2] Resuming diffusion from step 2." in log
  assert not (tmp_path / "2x2" / "train.log").exists()  # process logs are the worker's
  ref = results["1x1"]
  np.testing.assert_array_equal(ref["steps"], [2, 4])  # metrics written once, not per process
  for name in ("2x2", "1x4"):
    got = results[name]
    np.testing.assert_array_equal(got["steps"], ref["steps"])
    np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
    leaves = sorted(k for k in ref if k.startswith("leaf"))
    assert leaves and leaves == sorted(k for k in got if k.startswith("leaf"))
    for k in leaves:
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=f"{name} {k}")
    np.testing.assert_array_equal(got["samples"], ref["samples"], err_msg=name)
