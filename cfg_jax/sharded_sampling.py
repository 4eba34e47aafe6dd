"""Drawing many samples from a loaded model: fixed-size batches (`sample_batches`), each split
over all devices of all processes (`sample_sharded`: a 1-D mesh, the batch axis sharded).

The sampler itself is unchanged; jit propagates the labels' sharding. Random draws do not
depend on the sharding (JAX's partitionable threefry), so N devices give the single
device's samples, about N× faster.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.tree_util import Partial

from cfg_jax import distributed, errors, images, pipeline


def sample_batches(key, model: pipeline.Pipeline, labels: Sequence[int], *, batch_size: int = 256,
             progress: bool = False, mesh=None, **sample_options) -> np.ndarray:
  """One uint8 NHWC image per label, sampled in batches of `batch_size` over `mesh`.

  The last batch is padded to full size so every batch reuses one compiled sampler; batch
  i uses `fold_in(key, i)`. A swept scale (a 1-D array of G scales as `guidance_scale` or as
  the scale of `guidance`) gives (G, N, H, W, C), all G from one compiled call per batch
  with the same x_T for every scale. `mesh` defaults to every device; every process gets
  the whole result.
  """
  from tqdm.auto import tqdm

  labels = np.asarray(labels, np.int32)
  check_batch_size(batch_size)
  mesh = mesh or distributed.data_mesh()
  model = replicate_model(model, mesh)  # once, not per batch
  out = []
  starts = range(0, len(labels), batch_size)
  show = progress and distributed.is_main()
  for i, start in enumerate(tqdm(starts, desc="sampling", unit="batch", disable=not show)):
    chunk = labels[start:start + batch_size]
    padded = np.resize(chunk, min(batch_size, len(labels)))
    x = images.to_uint8(sample_sharded(jax.random.fold_in(key, i), model, padded, mesh,
                                   **sample_options))
    swept = x.ndim == len(model.output_shape) + 2  # (G, B, ...): the batch is axis 1
    out.append(x[:, :len(chunk)] if swept else x[:len(chunk)])
  if not out:
    return np.zeros((0, *model.output_shape), np.uint8)
  return np.concatenate(out, axis=1 if swept else 0)


def check_batch_size(batch_size: int) -> None:
  """`sample_batches`' check of its batch size, for callers that must fail before slow work."""
  if batch_size < 1:
    raise errors.InputError(f"batch_size must be positive, got {batch_size}.")


def sample_sharded(key, model: pipeline.Pipeline, labels, mesh=None,
                   **sample_options) -> np.ndarray:
  """`model.sample(key, labels, ...)` with the batch split over `mesh` (default: every
  device); the float samples as one numpy array on every process.

  A batch that the devices do not divide is padded (labels repeated) and cut back:
  rows do not depend on the batch size, so the padding changes no sample.
  """
  mesh = mesh or distributed.data_mesh()
  labels = np.asarray(labels, np.int32)
  padded = np.resize(labels, -(-len(labels) // mesh.size) * mesh.size)
  # x_T is made in shards over "data"; jit propagates that split through the sampler. The
  # labels stay a host array: the sampler checks their values, which a global array
  # spanning other hosts cannot show.
  x_init = _initial_noise(key, (len(padded), *model.image_shape),
                          NamedSharding(mesh, P("data")))
  x = distributed.to_host(
      replicate_model(model, mesh).sample(key, padded, x_init=x_init, **sample_options))
  swept = x.ndim == len(model.image_shape) + 2  # (G, B, ...): the batch is axis 1
  return x[:, :len(labels)] if swept else x[:len(labels)]


@functools.partial(jax.jit, static_argnames=("shape", "sharding"))
def _initial_noise(key, shape, sharding):
  """The x_T that `sampling.sample` draws from `key` itself (from the first half of its key
  split), made directly in shards."""
  x = jax.random.normal(jax.random.split(key)[0], shape, jnp.float32)
  return jax.lax.with_sharding_constraint(x, sharding)


def replicate_model(model: pipeline.Pipeline, mesh) -> pipeline.Pipeline:
  """The model with its parameters and schedule on every device of `mesh`."""
  if model.denoiser_fn is not None:  # eps_fn reads the same parameters: one copy of them
    denoiser_fn = distributed.replicate_tree(model.denoiser_fn, mesh)
    eps_fn = Partial(pipeline.eps_channels, denoiser_fn)
  else:
    denoiser_fn, eps_fn = None, distributed.replicate_tree(model.eps_fn, mesh)
  return dataclasses.replace(
      model, eps_fn=eps_fn, denoiser_fn=denoiser_fn,
      schedule=distributed.replicate_tree(model.schedule, mesh),
      classifier_fn=distributed.replicate_tree(model.classifier_fn, mesh),
      latent=distributed.replicate_tree(model.latent, mesh))
