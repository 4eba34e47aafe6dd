"""Real multi-process runs on this machine: 2 processes × 2 CPU devices, over gloo.

The README's recipe, literally: `train.py` in 2 processes, then `sample.py` on that workdir
in 2 processes and in 1, whose `.npz` files must be byte-identical. Then the same run is
resumed in 2 processes, and its losses and parameters must equal those of 1 process × 1
device trained alike (here, in the test's own process) to float tolerance. 1 process × many
devices against 1 device is tests/test_training.py's.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.helpers import REPO, TEST_XLA_FLAGS, saved_train_state

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
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each} {TEST_XLA_FLAGS}"}
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


def _no_evalnet(tmp_path):
  """A user cache with no evaluation network: nothing to judge, nothing trained for it."""
  return lambda i: {"XDG_CACHE_HOME": str(tmp_path / "cache")}


def run_recipe(tmp_path, name, command, processes):
  """Runs a README command (runs/mh → tmp_path/mh) as `processes` processes × 2 devices."""
  args = command.replace("runs/", f"{tmp_path}/").replace(".npz", f"-{name}.npz").split()
  children = spawn(tmp_path, name, [sys.executable, *args[1:]], processes, 2,
                   _no_evalnet(tmp_path))
  wait_all(children, TIMEOUT_S)
  return [open(log).read() for _, log in children]


def _reference_run(config, workdir, split):
  """The diffusion run of `train.py` on `config`, in this process on 1 device: its losses
  and final parameters. Trained to 4 steps and resumed to 6, as the 2 processes are."""
  from cfg_jax import distributed
  from cfg_jax.train import denoiser

  one = distributed.data_mesh(jax.devices()[:1])
  config.train.num_steps = 4
  denoiser.train(config, workdir, split, mesh=one)
  config.train.num_steps = 6
  _, state = denoiser.train(config, workdir, split, mesh=one)
  return _losses(workdir), jax.device_get((state.params, state.ema_params))


def _losses(workdir):
  """[(step, loss)] of the diffusion model, in the order metrics.jsonl has them."""
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(l["step"], l["diffusion/loss"]) for l in lines if "diffusion/loss" in l]


def test_readme_recipe_in_2_processes_samples_resumes_and_trains_like_1(tmp_path):
  readme = open(os.path.join(REPO, "README.md")).read()
  assert TRAIN_RECIPE in readme and SAMPLE_RECIPE in readme, "README and test disagree"
  from cfg_jax import data
  from configs import digits_tiny

  split = data.load_split("digits", "train")  # prepared once here; the processes only read it
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

  # Resumed in 2 processes (no grids; the train step compiled above is in the cache), while
  # this process trains the reference.
  resume = TRAIN_RECIPE.replace("runs/", f"{tmp_path}/").split()[1:] + [
      "--config.train.num_steps=6", "--config.sampling.guidance_scales=()",
      "--config.sampling.classifier_scales=()"]
  children = spawn(tmp_path, "resume", [sys.executable, *resume], 2, 2, _no_evalnet(tmp_path))
  try:
    want_losses, want_state = _reference_run(digits_tiny.get_config(), str(tmp_path / "ref"),
                                             split)
  finally:
    wait_all(children, TIMEOUT_S)  # never left running, even if the reference fails
  log = open(children[1][1]).read()
  assert "[process 1/2] Resuming diffusion from step 4." in log, log[-3000:]
  got_losses = _losses(work)
  assert [step for step, _ in got_losses] == [2, 4, 6]  # written once, by process 0
  assert [step for step, _ in want_losses] == [2, 4, 6]
  np.testing.assert_allclose([l for _, l in got_losses], [l for _, l in want_losses], rtol=1e-5)
  saved = saved_train_state(str(work), digits_tiny.get_config())
  got_state = jax.device_get((saved.params, saved.ema_params))
  got_leaves = dict(jax.tree_util.tree_flatten_with_path(got_state)[0])
  want_leaves = dict(jax.tree_util.tree_flatten_with_path(want_state)[0])
  assert want_leaves and got_leaves.keys() == want_leaves.keys()
  for path, want in want_leaves.items():
    np.testing.assert_allclose(got_leaves[path], want, rtol=1e-4, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))
