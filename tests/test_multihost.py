"""Real multi-process runs on this machine: 2 processes × 2 CPU devices, over gloo.

1. The library (`tests/multihost_worker.py`): trains the tiny config (checkpoint at step 2,
   resume to 4) and samples, then compares with 1 process × 1 device: losses and parameters
   to float tolerance, samples identical (1 process × many devices against 1 device is
   tests/test_training.py's).
2. The README's recipe, literally: `train.py` in 2 processes, then `sample.py` on that
   workdir in 2 processes and in 1; the two `.npz` files must be byte-identical.
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
# The README's "Two processes on one machine" commands, as printed there (checked below).
TRAIN_RECIPE = "python train.py --config configs/digits_tiny.py --workdir runs/mh"
SAMPLE_RECIPE = ("python sample.py --workdir runs/mh --out runs/mh.npz --num_steps 4 "
                 "--timestep_spacing trailing")


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def spawn(tmp_path, name, argv, processes, devices_each, extra_env=()):
  """Starts `argv` as `processes` JAX processes on localhost, each with `devices_each` CPU
  devices (a coordinator on a free port when more than one); returns [(Popen, log path)].
  `extra_env(i)` adds process i's own variables."""
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
    with open(log, "w") as log_file:  # the child keeps its own copy of the descriptor
      proc = subprocess.Popen(
          argv, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT,
          env={**env, **dict(extra_env(i) if extra_env else {}),
               **({"JAX_PROCESS_ID": str(i)} if processes > 1 else {})})
    children.append((proc, log))
  return children


def launch(tmp_path, name, processes, devices_each):
  """Starts `processes` workers; returns [(Popen, log path)] and the result path."""
  workdir, out = tmp_path / name, tmp_path / f"{name}.npz"
  # A persistent compilation cache per process: the resumed fit reuses the first compile.
  children = spawn(
      tmp_path, name, [sys.executable, "-m", "tests.multihost_worker", str(workdir), str(out)],
      processes, devices_each,
      lambda i: {"JAX_COMPILATION_CACHE_DIR": str(tmp_path / f"jit-cache-{name}-{i}")})
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
          for name, p, d in (("2x2", 2, 2), ("1x1", 1, 1))}
  wait_all([c for children, _ in runs.values() for c in children], TIMEOUT_S)
  results = {name: dict(np.load(out)) for name, (_, out) in runs.items()}
  assert (results["2x2"]["processes"], results["2x2"]["devices"]) == (2, 4)
  log = open(tmp_path / "2x2.1.log").read()
  assert "[process 1/2] Resuming diffusion from step 2." in log
  assert not (tmp_path / "2x2" / "train.log").exists()  # process logs are the worker's
  ref = results["1x1"]
  np.testing.assert_array_equal(ref["steps"], [2, 4])  # metrics written once, not per process
  got = results["2x2"]
  np.testing.assert_array_equal(got["steps"], ref["steps"])
  np.testing.assert_allclose(got["losses"], ref["losses"], rtol=1e-5)
  leaves = sorted(k for k in ref if k.startswith("leaf"))
  assert leaves and leaves == sorted(k for k in got if k.startswith("leaf"))
  for k in leaves:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)
  np.testing.assert_array_equal(got["samples"], ref["samples"])


def run_recipe(tmp_path, name, command, processes):
  """Runs a README command (runs/mh → tmp_path/mh) as `processes` processes × 2 devices."""
  args = command.replace("runs/", f"{tmp_path}/").replace(".npz", f"-{name}.npz").split()
  # No evaluation network in this cache: nothing to judge, nothing trained for it.
  children = spawn(tmp_path, name, [sys.executable, *args[1:]], processes, 2,
                   lambda i: {"XDG_CACHE_HOME": str(tmp_path / "cache")})
  wait_all(children, TIMEOUT_S)
  return [open(log).read() for _, log in children]


def test_readme_recipe_trains_in_2_processes_and_samples_like_1(tmp_path):
  readme = open(os.path.join(REPO, "README.md")).read()
  assert TRAIN_RECIPE in readme and SAMPLE_RECIPE in readme, "README and test disagree"
  from cfg_jax import data

  data.load_split("digits", "train")  # prepared once here; the processes only read it
  logs = run_recipe(tmp_path, "train", TRAIN_RECIPE, processes=2)
  assert "[process 1/2] Training on digits" in logs[1], logs[1][-3000:]
  work = tmp_path / "mh"
  assert {"samples_cfg_3.png", "samples_classifier_1.png", "train.log",
          "train.process1.log"} <= set(os.listdir(work))
  assert sorted(os.listdir(work / "checkpoints")) == ["2", "4"]
  run_recipe(tmp_path, "2x2", SAMPLE_RECIPE, processes=2)
  run_recipe(tmp_path, "1x2", SAMPLE_RECIPE, processes=1)
  two, one = (open(tmp_path / f"mh-{name}.npz", "rb").read() for name in ("2x2", "1x2"))
  assert two == one
  with np.load(tmp_path / "mh-1x2.npz") as f:
    assert f["arr_0"].shape == (100, 8, 8, 1)  # sample.py's default --num_samples
