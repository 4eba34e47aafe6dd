"""Training a diffusion model on a VAE's latents (latent diffusion, as DiT on the SD VAE).

The VAE comes from a workdir that holds one (`vae/`, e.g. a DiT converted by `convert.py
dit`) and stays frozen. The training split is encoded once, to the posterior's mean and log
variance; every step then draws z ~ q(z | x) = N(mean, exp(logvar)) afresh, as DiT's
`train.py` does (`latent_dist.sample()`), at the cost of one random draw instead of an
encoder pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cfg_jax import checkpoints, data, errors, models, paths
from cfg_jax.models.dit import vae


def vae_section(vae_workdir: str) -> dict:
  """The `latent` config section of the VAE saved in `vae_workdir` (the sampling pipeline's
  `LatentSpace` reads the same section), with `vae_workdir` recorded beside it."""
  directory = paths.vae_checkpoints(vae_workdir)
  if checkpoints.latest_step(directory) is None:
    raise errors.MissingFileError(f"{vae_workdir} holds no VAE ({directory}); set "
                                  "--config.latent.vae_workdir to a workdir written by "
                                  "convert.py dit.")
  return {**checkpoints.read_config(directory)["latent"], "vae_workdir": vae_workdir}


def restore_vae(vae_workdir: str, section):
  """(graphdef, params) of the frozen VAE of `vae_workdir`."""
  config = ml_collections.ConfigDict(dict(section))
  graphdef, abstract_params = models.abstract(vae.AutoencoderKL, config)
  params = checkpoints.restore_subtree(paths.vae_checkpoints(vae_workdir), "params",
                                       abstract_params)
  return graphdef, params


def encode_split(split: data.Split, graphdef, params, batch_size: int = 256) -> data.Split:
  """The split's images as the posterior's (mean, logvar), concatenated on the channel axis."""
  encode = jax.jit(lambda p, x: jnp.concatenate(vae.encode(graphdef, p, x), axis=-1))
  moments = [np.asarray(encode(params, split.images[i:i + batch_size]))
             for i in range(0, len(split), batch_size)]
  return data.Split(np.concatenate(moments), split.labels)


def sample_latents(moments, key, scaling_factor: float, shift_factor: float = 0.0):
  """z ~ N(mean, exp(logvar)) in the diffusion model's scale, from `encode_split`'s moments."""
  mean, logvar = jnp.split(moments, 2, axis=-1)
  z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
  return vae.to_diffusion_latent(z, scaling_factor, shift_factor)
