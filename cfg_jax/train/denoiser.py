"""Training the denoiser ε_θ(x_t, t, y) with conditioning dropout (Ho & Salimans 2021,
Algorithm 1).

The loss itself is `cfg_jax.diffusion.cfg_loss`; this module binds it to the config's network
(the UNet, or a DiT with `model.family = "dit"`) and runs it through the shared loop
(`cfg_jax.train.loop.fit`).
"""

from __future__ import annotations

import math
from typing import Optional

import jax

from cfg_jax import data, diffusion, models, paths, schedules
from cfg_jax.train import latent, loop

# Config sections that shape the saved state: resuming with other values is an error.
# seed and batch size fix the batches and keys of the steps still to come.
STATE_SECTIONS = ("data.name", "model", "latent", "diffusion", "seed", "train.batch_size")


def state_sections(config) -> tuple:
  """STATE_SECTIONS, and with a cosine decay the optimizer and `train.num_steps`."""
  return STATE_SECTIONS + loop.schedule_sections(config.optimizer, "optimizer",
                                                 "train.num_steps")


def create_denoiser(config, seed):
  """(graphdef, params) of the freshly initialised network of `config`; `seed` is an int or
  a key (training uses `loop.key_streams(config.seed).init`)."""
  return models.create(*models.denoiser(config), seed=seed)


def make_loss_fn(graphdef, schedule: schedules.Schedule, config) -> loop.LossFn:
  """`loss_fn(params, batch, key)`: the CFG ε-MSE of the network, with dropout, computed in
  `config.train.dtype` (float32 weights either way)."""
  null_label = data.spec(config.data.name).num_classes
  compute_dtype = config.train.get("dtype", "float32")

  section = config.get("latent")

  def loss_fn(params, batch, key):
    loss_key, dropout_key = jax.random.split(key)
    x0 = batch["image"]
    if section is not None:  # the batch holds q(z | x)'s moments: draw this step's z
      loss_key, latent_key = jax.random.split(loss_key)
      x0 = latent.sample_latents(x0, latent_key, section.scaling_factor, section.shift_factor)

    def eps_apply(params, x_t, t, y):
      return models.apply_in_dtype(graphdef, params, x_t, t, y, dtype=compute_dtype,
                                   dropout_key=dropout_key)

    loss, _ = diffusion.cfg_loss(params, eps_apply, schedule, x0, batch["label"],
                                 loss_key, p_uncond=config.diffusion.p_uncond,
                                 null_label=null_label,
                                 min_snr_gamma=min_snr_gamma(config))
    return loss, {}

  return loss_fn


def min_snr_gamma(config) -> Optional[float]:
  """The config's min-SNR γ, or None for the plain ε-MSE (γ absent, None, or inf: a flag
  cannot spell None, and min(SNR, ∞)/SNR = 1)."""
  gamma = config.diffusion.get("min_snr_gamma")
  return None if gamma is None or gamma == math.inf else float(gamma)


def make_train_step(graphdef, tx, schedule, config):
  """`train_step(state, batch, key) -> (state, metrics)`, pure and jittable."""
  return loop.make_train_step(make_loss_fn(graphdef, schedule, config), tx,
                              config.train.ema_decay)


def train(config, workdir: str, train_split: data.Split, mesh=None):
  """Trains (or resumes) the diffusion model; returns (graphdef, final TrainState)."""
  graphdef, params = create_denoiser(config, loop.key_streams(config.seed).init)
  loss_fn = make_loss_fn(graphdef, schedules.from_config(config.diffusion), config)
  return graphdef, fit(config, workdir, train_split, description="diffusion", loss_fn=loss_fn,
                       params=params, state_sections=state_sections(config), mesh=mesh)


def fit(config, workdir: str, train_split, *, description: str, loss_fn, params,
        state_sections: tuple, mesh=None):
  """`loop.fit` of a network in `workdir/checkpoints` with the config's optimizer, batch,
  steps, EMA and kept steps (the diffusion model, or a distilled student)."""
  return loop.fit(
      description=description, loss_fn=loss_fn, params=params,
      tx=loop.make_optimizer(**config.optimizer, num_steps=config.train.num_steps),
      ema_decay=config.train.ema_decay, split=train_split, seed=config.seed,
      batch_size=config.train.batch_size, num_steps=config.train.num_steps, workdir=workdir,
      checkpoint_dir=paths.diffusion_checkpoints(workdir), config=config,
      state_sections=state_sections, keep_steps=config.train.get("keep_steps", ()), mesh=mesh)
