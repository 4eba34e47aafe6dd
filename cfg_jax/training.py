"""Pieces shared by every trainer here: the state pytree, the optimizer, data-parallel
placement, and one training loop with logging, NaN checks and Orbax checkpoints."""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from cfg_jax import checkpoints


class TrainingError(RuntimeError):
  """Training cannot go on (a NaN loss, say); the message names the fix."""


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  ema_params: Any  # None when the trainer keeps no EMA
  opt_state: Any


def init_state(params, tx, with_ema: bool = False) -> TrainState:
  """Step 0; the EMA copy gets its own buffers, since train steps donate the state."""
  ema_params = jax.tree_util.tree_map(jnp.copy, params) if with_ema else None
  return TrainState(jnp.zeros((), jnp.int32), params, ema_params, tx.init(params))


def make_optimizer(learning_rate, warmup_steps, weight_decay, grad_clip_norm=1.0, b1=0.9,
                   b2=0.999) -> optax.GradientTransformation:
  """AdamW after global-norm clipping, with a linear warm-up to a constant rate."""
  schedule = optax.linear_schedule(0.0, learning_rate, max(int(warmup_steps), 1))
  return optax.chain(
      optax.clip_by_global_norm(grad_clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay),
  )


def ema_update(ema_params, params, step, decay):
  """EMA with the usual warm-up, min(decay, (1 + step) / (10 + step))."""
  rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree_util.tree_map(lambda e, p: rate * e + (1.0 - rate) * p, ema_params, params)


def data_mesh(devices=None):
  """A 1-D mesh over every device JAX sees (or the given ones), axis name "data"."""
  devices = jax.devices() if devices is None else devices
  # Auto axes: XLA propagates the batch sharding through the model (GSPMD).
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def replicate(tree, mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: dict, mesh) -> dict:
  """Global host batch → array split over the "data" axis.

  Every process builds the same global batch (the data order is a function of the step)
  and contributes its own slice, so the same code spans several hosts.
  """
  sharding = NamedSharding(mesh, P("data"))
  index, count = jax.process_index(), jax.process_count()

  def place(value):
    value = np.asarray(value)
    per_process = len(value) // count
    local = value[index * per_process:(index + 1) * per_process]
    return jax.make_array_from_process_local_data(sharding, local, value.shape)

  return {k: place(v) for k, v in batch.items()}


def jit_data_parallel(step_fn, mesh):
  """Jits `step_fn(state, batch, rng) -> (state, metrics)`: state replicated, batch sharded."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(step_fn, in_shardings=(replicated, sharded, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def check_batch_size(batch_size: int, mesh) -> None:
  if batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} must be divisible by the {mesh.size} devices; "
                     f"set --config.train.batch_size to a multiple of {mesh.size}.")


class MetricWriter:
  """Appends metrics to `metrics.jsonl` and TensorBoard event files under workdir."""

  def __init__(self, workdir: str, prefix: str):
    from tensorboardX import SummaryWriter

    self.prefix = prefix
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    metrics = {f"{self.prefix}/{k}": float(v) for k, v in metrics.items()}
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": int(step), **metrics}) + "\n")
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, int(step))
    self.tb.flush()

  def close(self):
    self.tb.close()


def fit(
    *,
    state: TrainState,
    train_step: Callable,
    batches: Iterator[dict],
    mesh,
    rng,
    num_steps: int,
    manager,
    config_dict: dict,
    writer: MetricWriter,
    log_every: int,
    checkpoint_every: int,
    batch_size: int,
    description: str,
) -> TrainState:
  """Runs `train_step` from `state.step` to `num_steps`, logging and checkpointing.

  A non-finite loss stops training before it can be checkpointed, so the last good
  checkpoint survives.
  """
  from tqdm.auto import tqdm

  start = int(state.step)
  bar = tqdm(total=num_steps, initial=start, desc=description, unit="step", mininterval=2.0,
             disable=start >= num_steps)
  last_time, last_step = time.perf_counter(), start
  for step in range(start, num_steps):
    state, metrics = train_step(state, shard_batch(next(batches), mesh), rng)
    done = step + 1
    if done % log_every == 0 or done % checkpoint_every == 0 or done == num_steps:
      metrics = jax.device_get(metrics)
      if not all(np.isfinite(v) for v in metrics.values()):
        raise TrainingError(
            f"{description}: non-finite metrics {metrics} at step {done}; lower the "
            f"learning rate or raise grad_clip_norm (the last checkpoint is kept).")
      now = time.perf_counter()
      metrics["images_per_second"] = (done - last_step) * batch_size / (now - last_time)
      last_time, last_step = now, done
      writer.write(done, metrics)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                      img_s=f"{metrics['images_per_second']:.0f}")
    if manager is not None and (done % checkpoint_every == 0 or done == num_steps):
      checkpoints.save(manager, done, state, config_dict)
    bar.update(1)
  bar.close()
  return state
