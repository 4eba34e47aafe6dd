"""What every trainer here shares: the state pytree with its update, the optimizer, the
EMA, data-parallel placement, and one training loop with metrics, NaN checks and Orbax
checkpoints.

A trainer supplies only `loss_fn(params, batch, key) -> (loss, metrics)`;
`make_train_step` turns it into the jittable `train_step(state, batch, key)`.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from cfg_jax import checkpoints, data, distributed, errors, paths, progress


class TrainingError(errors.UserError, RuntimeError):
  """Training cannot go on (a NaN loss, say); the message names the fix."""


@flax.struct.dataclass
class TrainState:
  """One pytree (vdm's layout): `step, params, ema_params, opt_state`."""

  step: jnp.ndarray
  params: Any
  ema_params: Any  # None when the trainer keeps no EMA
  opt_state: Any

  def apply_gradients(self, grads, tx: optax.GradientTransformation,
                      ema_decay: Optional[float] = None) -> "TrainState":
    """One optimizer step, then the EMA of the new parameters (when the state keeps one)."""
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema_params = self.ema_params
    if ema_params is not None:
      ema_params = ema_update(ema_params, params, self.step, ema_decay)
    return TrainState(self.step + 1, params, ema_params, opt_state)


def init_state(params, tx, with_ema: bool = False) -> TrainState:
  """Step 0; the EMA copy gets its own buffers, since train steps donate the state."""
  ema_params = jax.tree_util.tree_map(jnp.copy, params) if with_ema else None
  return TrainState(jnp.zeros((), jnp.int32), params, ema_params, tx.init(params))


class KeyStreams(NamedTuple):
  """Independent randomness for one trainer, split once from its seed."""

  init: jax.Array  # parameter initialisation
  train: jax.Array  # folded with the step: timesteps, noise, label drop, dropout
  data: int  # seed of the batch order


def key_streams(seed: int) -> KeyStreams:
  """Splits `key(seed)` once into separate streams.

  Deriving both the init keys (`nnx.Rngs` folds in 0, 1, …) and the step keys (folded with
  the step) from `key(seed)` itself would make step k reuse the k-th init key.
  """
  init, train, data_key = jax.random.split(jax.random.key(seed), 3)
  return KeyStreams(init, train, int(jax.random.randint(data_key, (), 0, 2**31 - 1)))


LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def make_train_step(loss_fn: LossFn, tx, ema_decay: Optional[float] = None):
  """The one update step of every trainer: `train_step(state, batch, key) -> (state, metrics)`.

  `loss_fn(params, batch, key) -> (loss, metrics)` gets a key folded with the step, so
  each step's randomness is a function of (key, step) and resumed runs repeat it exactly.
  """

  def train_step(state: TrainState, batch: dict, key):
    step_key = jax.random.fold_in(key, state.step)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch,
                                                                       step_key)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
    return state.apply_gradients(grads, tx, ema_decay), metrics

  return train_step


LR_DECAYS = ("constant", "cosine")


def learning_rate_schedule(learning_rate, warmup_steps, decay="constant", num_steps=None):
  """Linear warm-up from 0, then constant, or cosine decay to 0 at `num_steps`.

  A short run gains most from the decay: the last steps take small, averaging updates, as
  an EMA does, but without its lag behind the weights.
  """
  warmup_steps = max(int(warmup_steps), 1)
  if decay == "constant" or num_steps == 0:  # (no step runs at all in the second case)
    return optax.linear_schedule(0.0, learning_rate, warmup_steps)
  if decay == "cosine":
    if num_steps is None or num_steps <= warmup_steps:
      raise ValueError(f"decay='cosine' needs num_steps > warmup_steps, got {num_steps} and "
                       f"{warmup_steps}.")
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, num_steps)
  raise ValueError(f"Unknown learning-rate decay {decay!r}; use one of {LR_DECAYS}.")


def schedule_sections(optimizer, optimizer_key: str, num_steps_key: str) -> tuple:
  """The config entries a resumed run must keep for its learning rate to follow the same
  curve: none for a constant rate; the optimizer and the step count for a cosine decay."""
  if optimizer.get("decay", "constant") == "constant":
    return ()
  return (optimizer_key, num_steps_key)


def make_optimizer(learning_rate, warmup_steps, weight_decay, grad_clip_norm=1.0, b1=0.9,
                   b2=0.999, decay="constant", num_steps=None) -> optax.GradientTransformation:
  """AdamW after global-norm clipping, on `learning_rate_schedule`."""
  schedule = learning_rate_schedule(learning_rate, warmup_steps, decay, num_steps)
  return optax.chain(
      optax.clip_by_global_norm(grad_clip_norm),
      optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay),
  )


def ema_update(ema_params, params, step, decay):
  """EMA with the usual warm-up, min(decay, (1 + step) / (10 + step))."""
  rate = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree_util.tree_map(lambda e, p: rate * e + (1.0 - rate) * p, ema_params, params)


def shard_batch(batch: dict, mesh) -> dict:
  """This process's rows of the global batch → one global array split over "data".

  Each process reads only the rows its devices hold (`distributed.local_rows`; all of them
  on one host), so the same code spans several hosts.
  """
  sharding = NamedSharding(mesh, P("data"))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def jit_data_parallel(step_fn, mesh):
  """Jits `step_fn(state, batch, key) -> (state, metrics)`: state replicated, batch sharded."""
  replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(step_fn, in_shardings=(replicated, sharded, replicated),
                 out_shardings=(replicated, replicated), donate_argnums=0)


def check_batch_size(batch_size: int, mesh) -> None:
  if batch_size % mesh.size:
    raise errors.ConfigError(f"batch_size {batch_size} must be divisible by the {mesh.size} "
                             f"devices; set --config.train.batch_size to a multiple of "
                             f"{mesh.size}.")


def truncate_metrics(path: str, key_prefix: str, after_step: int) -> None:
  """Drops the records of `path` (metrics.jsonl) with a key starting with `key_prefix` and a
  step past `after_step`, atomically; a torn last line (a killed write) goes too."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record.get("step", 0) > after_step and any(k.startswith(key_prefix) for k in record):
      continue
    kept.append(line if line.endswith("\n") else line + "\n")
  if kept != lines:
    with paths.atomic_path(path, ".jsonl") as tmp, open(tmp, "w") as f:
      f.writelines(kept)


class MetricWriter:
  """Appends metrics to `metrics.jsonl` and TensorBoard event files under workdir."""

  def __init__(self, workdir: str, prefix: str):
    from tensorboardX import SummaryWriter

    self.prefix = prefix
    self.path = paths.metrics_file(workdir)
    self.tb = SummaryWriter(paths.tensorboard_dir(workdir))

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
    description: str,
    loss_fn: LossFn,
    params,
    tx: optax.GradientTransformation,
    split: data.Split,
    seed: int,
    batch_size: int,
    num_steps: int,
    workdir: str,
    config=None,
    checkpoint_dir: Optional[str] = None,
    state_sections: Sequence[str] = (),
    ema_decay: Optional[float] = None,
    log_every: Optional[int] = None,
    checkpoint_every: Optional[int] = None,
    keep_steps: Sequence[int] = (),
    mesh=None,
) -> TrainState:
  """Trains `params` with `loss_fn` on `split` to `num_steps`; the final TrainState.

  The step key and the batch order derive from `seed` (its `key_streams`: create `params`
  from `key_streams(seed).init`) and the step, so a resumed run repeats an uninterrupted one
  exactly. With `checkpoint_dir`, training resumes from its latest checkpoint (after
  `state_sections` of `config` are checked against the saved config) and saves every
  `checkpoint_every` steps and at the end; `log_every`, `checkpoint_every` and the number
  kept default to `config.train`'s. The checkpoints of `keep_steps` are saved too and never
  deleted.
  """
  mesh = mesh or distributed.data_mesh()
  check_batch_size(batch_size, mesh)
  if config is not None:
    log_every = log_every or config.train.log_every
    checkpoint_every = checkpoint_every or config.train.checkpoint_every
  streams = key_streams(seed)
  state = init_state(params, tx, with_ema=ema_decay is not None)
  mngr = None
  if checkpoint_dir is not None:
    mngr = checkpoints.manager(checkpoint_dir, config.train.max_checkpoints_to_keep,
                               keep_steps=keep_steps)
    state = checkpoints.resume(mngr, state, config.to_dict(), state_sections)
    if int(state.step):
      progress.say(f"Resuming {description} from step {int(state.step)}.")
  train_step = jit_data_parallel(make_train_step(loss_fn, tx, ema_decay), mesh)
  if distributed.is_main():
    # Steps logged after the checkpoint we resume from are run (and logged) again.
    truncate_metrics(paths.metrics_file(workdir), f"{description}/",
                     int(state.step))
  writer = distributed.on_main(MetricWriter, workdir, description)  # written once
  rows = distributed.local_rows(NamedSharding(mesh, P("data")), batch_size)
  try:
    return run_loop(
        state=distributed.replicate_tree(state, mesh), train_step=train_step,
        batches=data.batches(split, batch_size, streams.data, int(state.step), rows),
        mesh=mesh, key=streams.train, num_steps=num_steps, manager=mngr,
        config_dict=None if config is None else config.to_dict(), writer=writer,
        log_every=log_every, checkpoint_every=checkpoint_every or num_steps,
        batch_size=batch_size, description=description, keep_steps=keep_steps)
  finally:
    if mngr is not None:
      mngr.wait_until_finished()
    writer.close()


def run_loop(
    *,
    state: TrainState,
    train_step: Callable,
    batches: Iterator[dict],
    mesh,
    key,
    num_steps: int,
    manager,
    config_dict: Optional[dict],
    writer: MetricWriter,
    log_every: int,
    checkpoint_every: int,
    batch_size: int,
    description: str,
    keep_steps: Sequence[int] = (),
) -> TrainState:
  """Runs `train_step` from `state.step` to `num_steps`, logging and checkpointing.

  A non-finite metric stops training before its state can be checkpointed (metrics are
  checked at every step that logs or saves), so the last good checkpoint survives.
  """
  from tqdm.auto import tqdm

  start = int(state.step)
  bar = tqdm(total=num_steps, initial=start, desc=description, unit="step", mininterval=2.0,
             disable=start >= num_steps or not distributed.is_main())
  last_time, last_step = time.perf_counter(), start
  train_step = one_step_in_flight(train_step, mesh)
  for step in range(start, num_steps):
    state, metrics = train_step(state, shard_batch(next(batches), mesh), key)
    done = step + 1
    log = done % log_every == 0 or done % checkpoint_every == 0 or done == num_steps
    save = manager is not None and (done % checkpoint_every == 0 or done == num_steps
                                    or done in keep_steps)
    if log or save:
      metrics = jax.device_get(metrics)
      if not all(np.isfinite(v) for v in metrics.values()):
        raise TrainingError(
            f"{description}: non-finite metrics ({_numbers(metrics)}) at step {done}; lower the "
            f"learning rate or raise grad_clip_norm (the last checkpoint is kept).")
    if log:
      now = time.perf_counter()
      metrics["images_per_second"] = (done - last_step) * batch_size / (now - last_time)
      last_time, last_step = now, done
      writer.write(done, metrics)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}",
                      img_s=f"{metrics['images_per_second']:.0f}")
    if save:
      checkpoints.save(manager, done, state, config_dict)
    bar.update(1)
  bar.close()
  return state


def one_step_in_flight(train_step: Callable, mesh) -> Callable:
  """`train_step`, made to wait for the previous step before dispatching the next where
  queued steps could deadlock (several CPU devices in one process: `_collectives_can_starve`).
  Every loop over a data-parallel step on such a mesh should go through this."""
  if not _collectives_can_starve(mesh):
    return train_step

  def after_previous(state, batch, key):
    jax.block_until_ready(state)
    return train_step(state, batch, key)

  return after_previous


def _collectives_can_starve(mesh) -> bool:
  """Whether queued steps could deadlock XLA:CPU's in-process all-reduce.

  Several CPU devices of one process run their shares of a step on one shared thread pool.
  With steps queued ahead, the shares of step n + 1 can hold every thread while waiting at
  the gradient all-reduce for a share of step n that then never runs (seen on 2 cores with
  2 host devices: "Termination timeout for `all reduce`", abort). Dispatching a step only
  once the previous one is done rules this out; the cost is the dispatch latency alone.
  """
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  return len(local) > 1 and local[0].platform == "cpu"


def _numbers(metrics: dict) -> str:
  """"loss=nan, grad_norm=1.2e+03": metrics as plain numbers, not array reprs."""
  return ", ".join(f"{k}={float(v):.4g}" for k, v in metrics.items())
