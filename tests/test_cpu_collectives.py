"""Data-parallel training over several XLA:CPU devices of one process does not deadlock.

With steps queued ahead, the devices' shares of later steps can take every thread of the
shared pool while they wait at the gradient all-reduce for a share that never runs; XLA
then aborts the process after 40 s ("Termination timeout for `all reduce`"). It showed
with 2 host devices on 2 cores and fast steps (the evaluation network's training), so the
test trains the evaluation network's small CNN for many quick steps in a fresh process with 2 devices.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from cfg_jax import data, distributed
from cfg_jax.train import loop
from tests.helpers import REPO

SCRIPT = """
import sys
import jax, optax
from cfg_jax import data, distributed
from cfg_jax.evaluation import evalnet
from cfg_jax.train import loop

assert jax.device_count() == 2, jax.devices()
graphdef, params = evalnet._create("digits", evalnet.DEFAULTS)  # a small, fast CNN
state = loop.fit(description="quick", loss_fn=evalnet._loss_fn(graphdef), params=params,
                 tx=optax.adam(1e-3), split=data.load_split("digits", "train"), seed=0,
                 batch_size=128, num_steps=1000, workdir=sys.argv[1], log_every=500)
print("steps", int(state.step))
"""


@pytest.mark.slow
def test_many_quick_steps_over_two_cpu_devices_finish(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "steps 1000" in result.stdout


def test_several_cpu_devices_run_one_step_at_a_time(monkeypatch, tmp_path):
  assert jax.device_count() == 8  # tests/conftest.py
  assert loop._collectives_can_starve(distributed.data_mesh())
  assert not loop._collectives_can_starve(distributed.data_mesh(jax.devices()[:1]))
  waits = []
  real_wait = jax.block_until_ready
  monkeypatch.setattr(jax, "block_until_ready", lambda x: waits.append(1) or real_wait(x))
  rng = np.random.default_rng(0)
  split = data.Split(images=rng.normal(size=(64, 2, 2, 1)).astype(np.float32),
                     labels=np.zeros(64, np.int32))

  def loss_fn(params, batch, key):
    loss = jax.numpy.mean((batch["image"].sum((1, 2, 3)) * params["w"] - 1.0) ** 2)
    return loss, {}

  loop.fit(description="quick", loss_fn=loss_fn, params={"w": jax.numpy.ones(())},
           tx=optax.sgd(0.1), split=split, seed=0, batch_size=16, num_steps=5,
           workdir=str(tmp_path), log_every=5)
  assert len(waits) == 5  # before every step's dispatch
