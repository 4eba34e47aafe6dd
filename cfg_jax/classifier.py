"""The noisy classifier p_φ(y | x_t, t) for classifier guidance (Dhariwal & Nichol 2021).

Trained with cross-entropy on q_sample(x0, t, ε), t uniform over the whole schedule, as
guided-diffusion's `classifier_train.py`; its accuracy is reported per quarter of the
noise range, so users see where its gradient can still help.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.tree_util import Partial

from cfg_jax import checkpoints, data, diffusion, models, schedules, training
from cfg_jax.models import unet

STATE_SECTIONS = ("data.name", "diffusion", "classifier.model")


def create_classifier(config, seed: int):
  model_config = models.model_config(config, config.classifier.model)
  model = unet.NoisyClassifier(model_config, rngs=nnx.Rngs(seed))
  return unet.split_params(model)


def make_classifier_step(graphdef, tx, schedule):
  """step(state, batch, rng) -> (state, metrics): cross-entropy on noised images."""

  def step(state, batch, rng):
    t_rng, noise_rng, dropout_rng = jax.random.split(jax.random.fold_in(rng, state.step), 3)
    x0, labels = batch["image"], batch["label"]
    t = jax.random.randint(t_rng, labels.shape, 0, schedule.num_timesteps)
    x_t = diffusion.q_sample(schedule, x0, t, jax.random.normal(noise_rng, x0.shape))

    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(x_t, t, dropout_rng=dropout_rng)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, jnp.argmax(logits, -1) == labels

    (loss, correct), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "accuracy": jnp.mean(correct)}
    # Accuracy per quarter of the noise range, as guided-diffusion logs it (q0: low noise).
    quarter = t * 4 // schedule.num_timesteps
    for q in range(4):
      in_quarter = quarter == q
      metrics[f"accuracy_q{q}"] = jnp.sum(correct & in_quarter) / jnp.maximum(
          jnp.sum(in_quarter), 1)
    return training.TrainState(state.step + 1, params, None, opt_state), metrics

  return step


def accuracy_by_noise_quarter(classifier_fn, schedule, split: data.Split, seed: int = 0):
  """Accuracy on `split` with t drawn within each quarter of 0..T-1 (low noise first)."""
  rng = np.random.default_rng(seed)
  T = schedule.num_timesteps
  out = []
  for q in range(4):
    t = rng.integers(q * T // 4, (q + 1) * T // 4, len(split.labels))
    noise = rng.standard_normal(split.images.shape).astype(np.float32)
    x_t = diffusion.q_sample(schedule, split.images, t, noise)
    logits = jax.jit(classifier_fn)(x_t, jnp.asarray(t, jnp.int32))
    out.append(float(np.mean(np.argmax(logits, -1) == split.labels)))
  return out


def train_classifier(config, workdir: str, train_split: data.Split, mesh=None):
  """Trains (or resumes) the noisy classifier; returns it as `classifier_fn(x_t, t)`."""
  mesh = mesh or training.data_mesh()
  c = config.classifier
  training.check_batch_size(c.batch_size, mesh)
  graphdef, params = create_classifier(config, config.seed + 1)
  tx = training.make_optimizer(**c.optimizer)
  state = training.init_state(params, tx)
  mngr = checkpoints.manager(os.path.join(workdir, "classifier"),
                             config.train.max_checkpoints_to_keep)
  state = checkpoints.resume(mngr, state, config.to_dict(), STATE_SECTIONS)
  schedule = schedules.from_config(config.diffusion)
  step = training.jit_data_parallel(make_classifier_step(graphdef, tx, schedule), mesh)
  writer = training.MetricWriter(workdir, "classifier")
  try:
    state = training.fit(
        state=training.replicate(state, mesh), train_step=step, mesh=mesh,
        rng=jax.random.key(config.seed + 1),
        batches=data.batches(train_split, c.batch_size, config.seed + 1, int(state.step)),
        num_steps=c.num_steps, manager=mngr, config_dict=config.to_dict(), writer=writer,
        log_every=config.train.log_every, checkpoint_every=config.train.checkpoint_every,
        batch_size=c.batch_size, description="classifier")
    classifier_fn = Partial(unet.classifier_fn, graphdef, state.params)
    test = data.load_split(config.data.name, "test", config.data.data_dir or None)
    quarters = accuracy_by_noise_quarter(classifier_fn, schedule, test)
    writer.write(int(state.step), {f"test_accuracy_q{i}": a for i, a in enumerate(quarters)})
    logging.info("Noisy classifier test accuracy by noise quarter (low→high t): %s",
                 " ".join(f"{a:.3f}" for a in quarters))
  finally:
    mngr.wait_until_finished()
    writer.close()
  return classifier_fn


def load_classifier(workdir: str):
  """`classifier_fn(x_t, t)` from the latest classifier checkpoint in workdir."""
  directory = os.path.join(workdir, "classifier")
  config = ml_collections.ConfigDict(checkpoints.read_config(directory))
  graphdef, params = create_classifier(config, 0)
  tx = training.make_optimizer(**config.classifier.optimizer)
  target = checkpoints.abstract(training.init_state(params, tx))
  state, _ = checkpoints.restore(checkpoints.manager(directory, create=False), target)
  return Partial(unet.classifier_fn, graphdef, state.params), config
