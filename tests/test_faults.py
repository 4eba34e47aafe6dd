"""Fault tests: kill -9 and resume, resume equals uninterrupted, injected NaN, unreadable
checkpoints, the workdir lock."""

import json
import os
import random
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from cfg_jax import checkpoints, data, distributed, errors
from cfg_jax.app import locking
from cfg_jax.train import denoiser, loop
from tests.helpers import (REPO, TEST_XLA_FLAGS, TINY_CONFIG, assert_one_line_error,
                           run_cli, saved_train_state)

# Diffusion only, no grids: what a kill can interrupt is the loop and its checkpoints.
FAULT_FLAGS = ["--config.train.num_steps=12", "--config.train.log_every=1",
               "--config.train.checkpoint_every=3", "--config.classifier.num_steps=0",
               "--config.sampling.guidance_scales=()", "--config.sampling.classifier_scales=()"]


def _config(tiny_config, **train):
  tiny_config.unlock()
  tiny_config.train.update(train)
  tiny_config.classifier.num_steps = 0
  return tiny_config


def _assert_bitwise_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def _losses(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {l["step"]: l["diffusion/loss"] for l in lines if "diffusion/loss" in l}, lines


@pytest.mark.slow  # three compiles of the train step
def test_resume_equals_uninterrupted(tiny_config, digits_train, tmp_path):
  """Train 6 steps, or 2 and then resume to 6: the same losses at every step, bitwise."""
  config = _config(tiny_config, num_steps=6, log_every=1, checkpoint_every=2)
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  one = distributed.data_mesh(jax.devices()[:1])
  _, reference = denoiser.train(config, whole, digits_train, mesh=one)
  config.train.num_steps = 3  # stops after the step-2 checkpoint: step 3 is logged, then lost
  denoiser.train(config, split, digits_train, mesh=one)
  shutil.rmtree(os.path.join(split, "checkpoints", "3"))  # as if killed before saving step 3
  config.train.num_steps = 6
  _, resumed = denoiser.train(config, split, digits_train, mesh=one)
  _assert_bitwise_equal(jax.device_get(reference.params), jax.device_get(resumed.params))
  _assert_bitwise_equal(jax.device_get(reference.ema_params), jax.device_get(resumed.ema_params))
  want, _ = _losses(whole)
  got, lines = _losses(split)
  assert got == want and sorted(want) == [1, 2, 3, 4, 5, 6]
  steps = [l["step"] for l in lines if "diffusion/loss" in l]
  assert steps == sorted(set(steps)), "metrics.jsonl repeats steps logged after the checkpoint"


@pytest.mark.slow
def test_unreadable_latest_checkpoint_falls_back_to_the_one_before(tiny_workdir, tmp_path,
                                                                   tiny_config, digits_train):
  work = tmp_path / "run"
  shutil.copytree(tiny_workdir, work)
  steps = checkpoints.manager(str(work / "checkpoints")).all_steps()
  previous, last = sorted(steps)[-2:]
  latest = work / "checkpoints" / str(last)
  for path in (latest / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")
  config = _config(tiny_config)
  mngr = checkpoints.manager(str(work / "checkpoints"))
  _, params = denoiser.create_denoiser(config, 0)
  state = loop.init_state(params, loop.make_optimizer(**config.optimizer), with_ema=True)
  restored = checkpoints.resume(mngr, state, config.to_dict(), denoiser.STATE_SECTIONS)
  assert int(restored.step) == previous
  assert (tmp_path / "run" / f"checkpoints-unreadable-step{last}").is_dir()
  assert mngr.all_steps() == sorted(steps)[:-1]


@pytest.mark.slow
def test_injected_nan_stops_and_keeps_the_last_good_checkpoint(tiny_workdir, tmp_path,
                                                               tiny_config, digits_train):
  work = str(tmp_path / "run")
  shutil.copytree(tiny_workdir, work)
  last = checkpoints.manager(os.path.join(work, "checkpoints")).latest_step()
  good = os.path.join(work, "checkpoints", str(last))
  before = _digest(good)
  config = _config(tiny_config, num_steps=last + 4)
  # NaN images rather than a diverging learning rate: the same compiled train step as
  # test_resume_equals_uninterrupted's, so no compile of its own.
  poisoned = data.Split(images=np.full_like(digits_train.images, np.nan),
                        labels=digits_train.labels)
  one = distributed.data_mesh(jax.devices()[:1])
  with pytest.raises(loop.TrainingError, match=r"non-finite metrics \(.*loss=nan") as info:
    denoiser.train(config, work, poisoned, mesh=one)
  assert "array(" not in str(info.value)
  assert checkpoints.manager(os.path.join(work, "checkpoints")).latest_step() == last
  assert _digest(good) == before
  config.train.num_steps = last + 2
  _, state = denoiser.train(config, work, digits_train, mesh=one)
  assert int(state.step) == last + 2


def _tiny_checkpoints(directory, steps=(1, 2)):
  """A manager holding a small state at `steps`, and that state."""
  state = {"w": jax.numpy.arange(3.0), "b": {"c": jax.numpy.ones((2, 2))}}
  mngr = checkpoints.manager(str(directory))
  for step in steps:
    checkpoints.save(mngr, step, state, {"seed": 0})
  mngr.wait_until_finished()
  return mngr, state


def _garble(step_dir):
  for path in (step_dir / "state").rglob("*"):
    if path.is_file():
      path.write_bytes(b"garbage")


def test_a_state_that_does_not_fit_is_a_mismatch_and_moves_no_checkpoint(tmp_path):
  """Another tree structure reads fine without a target: not "unreadable", nothing moved."""
  mngr, state = _tiny_checkpoints(tmp_path / "ckpt")
  other = {"w": state["w"], "extra": state["w"]}  # as if the code's state had changed
  with pytest.raises(checkpoints.CheckpointMismatchError, match="new --workdir") as info:
    checkpoints.resume(mngr, other, {"seed": 0}, ("seed",))
  assert not isinstance(info.value, checkpoints.CheckpointError)  # no fallback from this one
  assert "tree structures do not match" in str(info.value)
  assert mngr.all_steps() == [1, 2] and sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_only_process_0_moves_an_unreadable_checkpoint_aside(tmp_path, monkeypatch):
  """Process i > 0 leaves the move to process 0, waits at a barrier, then reloads."""
  from cfg_jax import distributed

  mngr, state = _tiny_checkpoints(tmp_path / "ckpt")
  _garble(tmp_path / "ckpt" / "2")
  aside = tmp_path / "ckpt-unreadable-step2"
  barriers = []

  def process_0_moves_it_meanwhile(name):
    barriers.append(name)
    os.replace(tmp_path / "ckpt" / "2", aside)

  monkeypatch.setattr(distributed, "is_main", lambda: False)
  monkeypatch.setattr(distributed, "barrier", process_0_moves_it_meanwhile)
  restored = checkpoints.resume(mngr, state, {"seed": 0}, ("seed",))
  assert len(barriers) == 1 and aside.is_dir()
  assert mngr.all_steps() == [1]
  np.testing.assert_array_equal(restored["w"], state["w"])
  monkeypatch.undo()  # as process 0 itself: it moves the folder, and the barrier is a no-op
  mngr, state = _tiny_checkpoints(tmp_path / "again")
  _garble(tmp_path / "again" / "2")
  checkpoints.resume(mngr, state, {"seed": 0}, ("seed",))
  assert (tmp_path / "again-unreadable-step2").is_dir() and mngr.all_steps() == [1]


def test_several_processes_never_train_the_evaluation_network(tmp_path, monkeypatch):
  """The lock holder would enter collectives alone: a clear error names the command."""
  from cfg_jax import distributed
  from cfg_jax.evaluation import evalnet

  monkeypatch.setattr(distributed, "process_count", lambda: 2)
  directory = tmp_path / "evalnet" / "digits"
  with pytest.raises(errors.UserError, match="train it once in a single process: python -c "
                     r"\"from cfg_jax.evaluation import evalnet; evalnet.load_or_train"):
    evalnet.load_or_train("digits", str(directory))
  assert not (tmp_path / "evalnet").exists()  # no lock file, no folder


def _digest(directory):
  import hashlib

  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def test_workdir_lock_refuses_a_second_holder_and_names_the_pid(tmp_path):
  path = str(tmp_path / "train.lock")
  with locking.exclusive(path):
    with pytest.raises(errors.WorkdirLockedError, match=f"process {os.getpid()}"):
      with locking.exclusive(path):
        pass
  with locking.exclusive(path):  # released on exit
    pass


@pytest.mark.slow
def test_second_train_py_on_a_busy_workdir_is_refused_at_once(tmp_path):
  work = tmp_path / "run"
  work.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", (
      "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
      "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode());"
      "print('locked', flush=True); time.sleep(60)"), str(work / "train.lock")],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    started = time.perf_counter()
    result = run_cli("train.py", "--config", TINY_CONFIG, "--workdir", work)
    assert_one_line_error(result, f"in use by process {holder.pid}")
    assert time.perf_counter() - started < 60
    assert sorted(os.listdir(work)) == ["train.lock"]
  finally:
    holder.kill()
    holder.wait()


def _checkpoint_steps(work):
  directory = os.path.join(work, "checkpoints")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(
      directory) else []


def _saving(work):
  directory = os.path.join(work, "checkpoints")
  return os.path.isdir(directory) and any("tmp" in n for n in os.listdir(directory))


def _logged_steps(work):
  path = os.path.join(work, "metrics.jsonl")
  return sum(1 for _ in open(path)) if os.path.exists(path) else 0


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_bitwise_uninterrupted(tmp_path):
  """Five SIGKILLs (in start-up, in the loop, during asynchronous checkpoint saves), each
  followed by a resume; the final state equals an uninterrupted run's, bit for bit."""
  rng = random.Random(11)
  work, whole = str(tmp_path / "killed"), str(tmp_path / "whole")
  args = [sys.executable, "train.py", "--config", TINY_CONFIG, *FAULT_FLAGS, "--workdir"]
  # A cache of its own, without the shared one's size limit: a kill while JAX writes an
  # entry would leave it half-written for every other test.
  env = {**os.environ, "XLA_FLAGS": TEST_XLA_FLAGS,
         "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jit-cache")}
  env.pop("JAX_COMPILATION_CACHE_MAX_SIZE", None)
  reference = subprocess.Popen(args + [whole], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
  # When to kill: a random moment of start-up, random logged steps, checkpoint saves (with
  # a late step as fallback, so every run is killed before it could finish).
  late = lambda: _logged_steps(work) >= 11
  triggers = [("start-up", lambda t0=None: False, rng.uniform(0.5, 3.0)),
              ("loop", lambda n=rng.randint(1, 5): _logged_steps(work) >= n, None),
              ("save", lambda: _saving(work) or late(), None),
              ("loop", lambda n=rng.randint(5, 9): _logged_steps(work) >= n, None),
              ("save", lambda: _saving(work) or late(), None)]
  kills = []
  for name, trigger, deadline in triggers:
    proc = subprocess.Popen(args + [work], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    started, during_save = time.perf_counter(), False
    while proc.poll() is None:
      if trigger() or (deadline and time.perf_counter() - started > deadline):
        during_save = _saving(work)
        proc.kill()
        break
      time.sleep(0.002)
    proc.wait()
    kills.append((name, proc.returncode, during_save, _checkpoint_steps(work)))
  assert all(code == -9 for _, code, _, _ in kills), kills
  assert any(during_save for _, _, during_save, _ in kills), kills
  result = subprocess.run(args + [work], cwd=REPO, env=env, capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  assert reference.wait() == 0, reference.stderr.read()[-3000:]
  from configs import digits_tiny

  config = digits_tiny.get_config()
  final, expected = saved_train_state(work, config), saved_train_state(whole, config)
  assert int(final.step) == int(expected.step) == 12
  _assert_bitwise_equal(expected.params, final.params)
  _assert_bitwise_equal(expected.ema_params, final.ema_params)
  # No corrupt checkpoint left: every one that remains restores.
  mngr = checkpoints.manager(os.path.join(work, "checkpoints"), create=False)
  for step in mngr.all_steps():
    checkpoints.restore(mngr, checkpoints.restore_target(expected), step)
  assert not _saving(work)
  steps = [json.loads(l)["step"] for l in open(os.path.join(work, "metrics.jsonl"))]
  assert steps == list(range(1, 13)), "metrics.jsonl repeats or misses steps"


@pytest.mark.slow
def test_evaluation_network_is_trained_once_and_renamed_into_place(tmp_path):
  """A second process waits on the lock, then loads; the folder is never half-written."""
  import threading

  from cfg_jax.evaluation import evalnet

  directory = str(tmp_path / "evalnet" / "digits")
  results = []
  with locking.exclusive(directory + ".lock", wait=True):  # another sweep is training it
    worker = threading.Thread(target=lambda: results.append(
        evalnet.load_or_train("digits", directory, num_steps=5, batch_size=32)))
    worker.start()
    time.sleep(1.0)
    assert worker.is_alive() and not os.path.exists(directory)
  worker.join()
  assert os.path.isdir(directory) and sorted(os.listdir(tmp_path / "evalnet")) == [
      "digits", "digits.lock"]  # no temporary folder left behind
  again = evalnet.load_or_train("digits", directory, num_steps=5, batch_size=32)
  assert again.test_accuracy == results[0].test_accuracy
