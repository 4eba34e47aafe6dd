"""Training the classifier-free-guided diffusion model: `train_and_evaluate(config, workdir)`."""

from __future__ import annotations

import logging
import os

import jax
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.tree_util import Partial

from cfg_jax import (checkpoints, classifier, data, diffusion, images, models, sampling,
                     schedules, training)
from cfg_jax.models import unet

# Config sections that shape the saved state: resuming with other values is an error.
STATE_SECTIONS = ("data.name", "model", "diffusion")


def create_unet(config, seed: int):
  return unet.split_params(unet.UNet(models.model_config(config), rngs=nnx.Rngs(seed)))


def make_train_step(graphdef, tx, schedule, config):
  """train_step(state, batch, rng) -> (state, metrics), pure and jittable."""
  null_label = data.spec(config.data.name).num_classes

  def train_step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)
    loss_rng, dropout_rng = jax.random.split(rng)

    def eps_apply(params, x_t, t, y):
      return nnx.merge(graphdef, params)(x_t, t, y, dropout_rng=dropout_rng)

    def loss_fn(params):
      return diffusion.cfg_loss(params, eps_apply, schedule, batch["image"], batch["label"],
                                loss_rng, p_uncond=config.diffusion.p_uncond,
                                null_label=null_label)

    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = training.ema_update(state.ema_params, params, state.step, config.train.ema_decay)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return training.TrainState(state.step + 1, params, ema, opt_state), metrics

  return train_step


def eps_function(graphdef, params):
  """The UNet as `eps_fn(x_t, t, y)` for the sampler; params stay traced, no recompiles."""
  return Partial(unet.eps_fn, graphdef, params)


def train_diffusion(config, workdir: str, train_split: data.Split, mesh=None):
  """Trains (or resumes) the diffusion model; returns (graphdef, final TrainState)."""
  mesh = mesh or training.data_mesh()
  training.check_batch_size(config.train.batch_size, mesh)
  graphdef, params = create_unet(config, config.seed)
  tx = training.make_optimizer(**config.optimizer)
  state = training.init_state(params, tx, with_ema=True)
  mngr = checkpoints.manager(os.path.join(workdir, "checkpoints"),
                             config.train.max_checkpoints_to_keep)
  state = checkpoints.resume(mngr, state, config.to_dict(), STATE_SECTIONS)
  if int(state.step):
    logging.info("Resuming the diffusion model from step %d.", int(state.step))
  logging.info("UNet: %d parameters.", unet.count_params(params))
  state = training.replicate(state, mesh)
  train_step = training.jit_data_parallel(
      make_train_step(graphdef, tx, schedules.from_config(config.diffusion), config), mesh)
  writer = training.MetricWriter(workdir, "diffusion")
  try:
    state = training.fit(
        state=state, train_step=train_step, mesh=mesh, rng=jax.random.key(config.seed),
        batches=data.batches(train_split, config.train.batch_size, config.seed, int(state.step)),
        num_steps=config.train.num_steps, manager=mngr, config_dict=config.to_dict(),
        writer=writer, log_every=config.train.log_every,
        checkpoint_every=config.train.checkpoint_every, batch_size=config.train.batch_size,
        description="diffusion")
  finally:
    mngr.wait_until_finished()
    writer.close()
  return graphdef, state


def load_diffusion(workdir: str):
  """(eps_fn over the EMA parameters, saved config) from the latest checkpoint in workdir."""
  directory = os.path.join(workdir, "checkpoints")
  config = ml_collections.ConfigDict(checkpoints.read_config(directory))
  graphdef, params = create_unet(config, 0)
  tx = training.make_optimizer(**config.optimizer)
  target = checkpoints.abstract(training.init_state(params, tx, with_ema=True))
  state, _ = checkpoints.restore(checkpoints.manager(directory, create=False), target)
  return eps_function(graphdef, state.ema_params), config


def sample_grid(path, eps_fn, config, guidance_scale, seed, classifier_fn=None,
                classifier_scale=0.0):
  """Samples `samples_per_class` images of every class and writes one row per class."""
  spec = data.spec(config.data.name)
  labels = np.repeat(np.arange(spec.num_classes), config.sampling.samples_per_class)
  x = sampling.sample(
      jax.random.key(seed), eps_fn, schedules.from_config(config.diffusion), labels,
      image_shape=spec.image_shape, method=config.sampling.method,
      num_steps=config.sampling.num_steps, eta=config.sampling.eta,
      guidance_scale=guidance_scale, null_label=spec.num_classes,
      classifier_fn=classifier_fn, classifier_scale=classifier_scale)
  images.save_grid(path, images.to_uint8(x), num_rows=spec.num_classes)
  return path


def train_and_evaluate(config, workdir: str) -> None:
  """The main job: diffusion model, noisy classifier, then sample grids in workdir."""
  os.makedirs(workdir, exist_ok=True)
  train_split = data.load_split(config.data.name, "train", config.data.data_dir or None,
                                config.data.download)
  graphdef, state = train_diffusion(config, workdir, train_split)
  eps_fn = eps_function(graphdef, state.ema_params)
  classifier_fn = None
  if config.classifier.num_steps > 0:
    classifier_fn = classifier.train_classifier(config, workdir, train_split)
  for scale in config.sampling.guidance_scales:
    path = sample_grid(os.path.join(workdir, f"samples_cfg_{scale:g}.png"), eps_fn, config,
                       scale, config.seed)
    logging.info("Wrote %s", path)
  if classifier_fn is not None:
    for scale in config.sampling.classifier_scales:
      path = sample_grid(os.path.join(workdir, f"samples_classifier_{scale:g}.png"), eps_fn,
                         config, 0.0, config.seed, classifier_fn, scale)
      logging.info("Wrote %s", path)
