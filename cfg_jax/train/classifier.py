"""Training the noisy classifier p_φ(y | x_t, t) for classifier guidance (Dhariwal & Nichol
2021).

Cross-entropy on q_sample(x0, t, ε) with t uniform over the whole schedule, as
guided-diffusion's `classifier_train.py`; accuracy is reported per quarter of the noise
range, so users see where its gradient can still help.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.tree_util import Partial

from cfg_jax import data, diffusion, distributed, models, paths, schedules
from cfg_jax.models import unet
from cfg_jax.train import loop

STATE_SECTIONS = ("data.name", "diffusion", "classifier.model", "seed", "classifier.batch_size")


def state_sections(config) -> tuple:
  """STATE_SECTIONS, and with a cosine decay the classifier's optimizer and step count."""
  return STATE_SECTIONS + loop.schedule_sections(config.classifier.optimizer,
                                                 "classifier.optimizer", "classifier.num_steps")


def create_classifier(config, seed: int):
  """(graphdef, params) of a freshly initialised noisy classifier for `config`."""
  return models.create(unet.NoisyClassifier,
                       models.model_config(config, config.classifier.model), seed=seed)


def make_loss_fn(graphdef, schedule: schedules.Schedule, dtype="float32") -> loop.LossFn:
  """`loss_fn(params, batch, key)`: cross-entropy on noised images, with accuracies; the
  network computes in `dtype` (float32 weights either way)."""

  def loss_fn(params, batch, key):
    t_key, noise_key, dropout_key = jax.random.split(key, 3)
    x0, labels = batch["image"], batch["label"]
    t = jax.random.randint(t_key, labels.shape, 0, schedule.num_timesteps)
    x_t = diffusion.q_sample(schedule, x0, t, jax.random.normal(noise_key, x0.shape))
    logits = models.apply_in_dtype(graphdef, params, x_t, t, dtype=dtype,
                                   dropout_key=dropout_key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    correct = jnp.argmax(logits, -1) == labels
    metrics = {"accuracy": jnp.mean(correct)}
    # Accuracy per quarter of the noise range, as guided-diffusion logs it (q0: low noise).
    quarter = t * 4 // schedule.num_timesteps
    for q in range(4):
      in_quarter = quarter == q
      metrics[f"accuracy_q{q}"] = jnp.sum(correct & in_quarter) / jnp.maximum(
          jnp.sum(in_quarter), 1)
    return loss, metrics

  return loss_fn


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


def train(config, workdir: str, train_split: data.Split, mesh=None):
  """Trains (or resumes) the noisy classifier; returns it as `classifier_fn(x_t, t)`."""
  c = config.classifier
  seed = config.seed + 1  # its own seed: not the diffusion model's batches or keys
  graphdef, params = create_classifier(config, loop.key_streams(seed).init)
  schedule = schedules.from_config(config.diffusion)
  loss_fn = make_loss_fn(graphdef, schedule, config.train.get("dtype", "float32"))
  state = loop.fit(
      description="classifier", loss_fn=loss_fn, params=params,
      tx=loop.make_optimizer(**c.optimizer, num_steps=c.num_steps), split=train_split, seed=seed,
      batch_size=c.batch_size, num_steps=c.num_steps, workdir=workdir,
      checkpoint_dir=paths.classifier_checkpoints(workdir), config=config,
      state_sections=state_sections(config), mesh=mesh)
  classifier_fn = Partial(models.apply, graphdef, state.params)
  test = data.load_split(config.data.name, "test", config.data.data_dir or None)
  quarters = accuracy_by_noise_quarter(classifier_fn, schedule, test)
  if distributed.is_main():
    # The test accuracy is written again after every (re)run of fit: keep one record of it.
    loop.truncate_metrics(paths.metrics_file(workdir), "classifier/test_accuracy",
                          int(state.step) - 1)
  writer = distributed.on_main(loop.MetricWriter, workdir, "classifier")
  writer.write(int(state.step), {f"test_accuracy_q{i}": a for i, a in enumerate(quarters)})
  writer.close()
  logging.info("Noisy classifier test accuracy by noise quarter (low→high t): %s",
               " ".join(f"{a:.3f}" for a in quarters))
  return classifier_fn, quarters
