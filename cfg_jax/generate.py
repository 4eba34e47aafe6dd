"""Drawing many samples from a trained model in fixed-size batches (what `sample.py` and
sweeps run), and `sample.py`'s whole job: sample, then write the `.npz` and a PNG grid.

Every batch is split over all devices of all processes (a 1-D mesh, the batch axis
sharded); the sampler itself is unchanged, jit propagates the labels' sharding. Random
draws do not depend on the sharding (JAX's partitionable threefry), so N devices give the
single device's samples, about N× faster.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cfg_jax import (checkpoints, distributed, errors, guidance as guidance_lib, io,
                     pipeline as pipeline_lib)
from cfg_jax.train import diffusion as diffusion_training


def generate(key, model: pipeline_lib.Pipeline, labels: Sequence[int], *, batch_size: int = 256,
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
  if batch_size < 1:
    raise errors.InputError(f"batch_size must be positive, got {batch_size}.")
  mesh = mesh or _mesh()
  model = replicated(model, mesh)  # once, not per batch
  out = []
  starts = range(0, len(labels), batch_size)
  show = progress and distributed.is_main()
  for i, start in enumerate(tqdm(starts, desc="sampling", unit="batch", disable=not show)):
    chunk = labels[start:start + batch_size]
    padded = np.resize(chunk, min(batch_size, len(labels)))
    x = io.to_uint8(sample_sharded(jax.random.fold_in(key, i), model, padded, mesh,
                                   **sample_options))
    swept = x.ndim == len(model.image_shape) + 2  # (G, B, ...): the batch is axis 1
    out.append(x[:, :len(chunk)] if swept else x[:len(chunk)])
  if not out:
    return np.zeros((0, *model.image_shape), np.uint8)
  return np.concatenate(out, axis=1 if swept else 0)


def guidance_rule(model: pipeline_lib.Pipeline, workdir: str, guidance: str = "cfg",
                  guidance_scale=None, *, weak_workdir: Optional[str] = None,
                  weak_step: Optional[int] = None, method: Optional[str] = None, **options):
  """The guidance rule that sample.py/sweep.py's flags describe, for `model` (loaded from
  `workdir`); loads autoguidance's weak model from `weak_workdir` (default: `workdir`) at
  `weak_step` (default: its latest). `options` are `guidance.make_rule`'s."""
  wants_weak = weak_workdir is not None or weak_step is not None
  if wants_weak and guidance != "autoguidance":
    raise errors.InputError(f"--weak_workdir and --weak_step apply to --guidance=autoguidance "
                            f"only, not --guidance={guidance}.")
  weak_eps_fn = None
  if guidance == "autoguidance" and wants_weak:
    weak_workdir = weak_workdir or workdir
    if os.path.abspath(weak_workdir) == os.path.abspath(workdir):
      latest = checkpoints.latest_step(os.path.join(weak_workdir,
                                                  diffusion_training.CHECKPOINT_DIR))
      if weak_step is None or weak_step == latest:
        raise errors.InputError(f"The weak model would be the main model itself (step "
                                f"{latest}); pass an earlier --weak_step or another "
                                "--weak_workdir.")
    weak_eps_fn = pipeline_lib.load_weak(model, weak_workdir, weak_step).eps_fn
  return guidance_lib.make_rule(guidance, guidance_scale, method=method,
                                weak_eps_fn=weak_eps_fn, **options)


def check_sample_options(model: pipeline_lib.Pipeline, *, batch_size: int = 1,
                         num_steps=None, eta=None, method=None, **scales) -> None:
  """Raises an InputError for a sampler flag that cannot work, before anything is sampled
  (the sampler's own checks are for library callers)."""
  if batch_size < 1:
    raise errors.InputError(f"--batch_size must be positive, got {batch_size}.")
  T = model.schedule.num_timesteps
  if num_steps is not None and not 1 <= num_steps <= T:
    raise errors.InputError(f"--num_steps must be an int in 1..{T}, got {num_steps}.")
  if eta is not None and not (math.isfinite(eta) and eta >= 0):
    raise errors.InputError(f"--eta must be a finite number >= 0, got {eta}.")
  if method == "ddpm" and eta:
    raise errors.InputError("--eta applies to --method=ddim only; DDPM's noise is fixed.")
  for name, value in scales.items():
    if isinstance(value, (int, float)) and not math.isfinite(value):
      raise errors.InputError(f"--{name} must be a finite number, got {value}.")


def sample_sharded(key, model: pipeline_lib.Pipeline, labels, mesh=None,
                   **sample_options) -> np.ndarray:
  """`model.sample(key, labels, ...)` with the batch split over `mesh` (default: every
  device); the float samples as one numpy array on every process.

  A batch that the devices do not divide is padded (labels repeated) and cut back:
  rows do not depend on the batch size, so the padding changes no sample.
  """
  mesh = mesh or _mesh()
  labels = np.asarray(labels, np.int32)
  padded = np.resize(labels, -(-len(labels) // mesh.size) * mesh.size)
  # x_T is made in shards over "data"; jit propagates that split through the sampler. The
  # labels stay a host array: the sampler checks their values, which a global array
  # spanning other hosts cannot show.
  x_init = _initial_noise(key, (len(padded), *model.image_shape),
                          NamedSharding(mesh, P("data")))
  x = distributed.to_host(
      replicated(model, mesh).sample(key, padded, x_init=x_init, **sample_options))
  swept = x.ndim == len(model.image_shape) + 2  # (G, B, ...): the batch is axis 1
  return x[:, :len(labels)] if swept else x[:len(labels)]


@functools.partial(jax.jit, static_argnames=("shape", "sharding"))
def _initial_noise_jit(key, shape, sharding):
  x = jax.random.normal(jax.random.split(key)[0], shape, jnp.float32)
  return jax.lax.with_sharding_constraint(x, sharding)


def _initial_noise(key, shape, sharding):
  """The x_T that `sampling.sample` draws from `key` itself (from the first half of its
  key split), made directly in shards."""
  return _initial_noise_jit(key, tuple(shape), sharding)


def replicated(model: pipeline_lib.Pipeline, mesh) -> pipeline_lib.Pipeline:
  """The model with its parameters and schedule on every device of `mesh`."""
  return dataclasses.replace(
      model, eps_fn=distributed.replicate_tree(model.eps_fn, mesh),
      schedule=distributed.replicate_tree(model.schedule, mesh),
      classifier_fn=distributed.replicate_tree(model.classifier_fn, mesh))


def _mesh():
  from cfg_jax.train import loop

  return loop.data_mesh()


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
  """0, 1, …, K−1, 0, 1, … (num_samples of them)."""
  return np.arange(num_samples) % num_classes


def sample_to_npz(*, workdir: str, out: str, num_samples: int,
                  labels: Optional[Sequence[int]] = None, seed: int = 0, batch_size: int = 256,
                  classifier_workdir: Optional[str] = None, overwrite: bool = False,
                  rule: Optional[dict] = None, **sample_options) -> tuple[str, str]:
  """Loads the EMA model, samples `num_samples` images (labels cycled, default balanced),
  and writes the .npz and a PNG grid beside it; returns both paths.

  `rule` holds `guidance_rule`'s keywords (the --guidance flags); the rule it builds is
  passed to the sampler as `guidance`.
  """
  if num_samples < 1:
    raise errors.InputError(f"--num_samples must be positive, got {num_samples}.")
  if batch_size < 1:
    raise errors.InputError(f"--batch_size must be positive, got {batch_size}.")
  io.check_output_free(out, overwrite)
  io.check_output_free(io.grid_path_beside(out), overwrite)
  model = pipeline_lib.load(workdir, classifier_workdir)
  check_sample_options(model, batch_size=batch_size, **sample_options)
  if labels is None:
    label_array = balanced_labels(num_samples, model.num_classes)
  else:
    label_array = np.resize(np.asarray(labels, np.int64), num_samples)
  bad = label_array[(label_array < 0) | (label_array >= model.num_classes)]
  if bad.size:
    raise errors.InputError(f"label {bad[0]} is out of range; this model's classes are "
                            f"0..{model.num_classes - 1}.")
  if sample_options.get("classifier_scale", 0) != 0 and model.classifier_fn is None:
    raise errors.InputError(f"--classifier_scale needs a noisy classifier, but {workdir} has "
                            "none; train one (config.classifier.num_steps > 0) or pass "
                            "--classifier_workdir.")
  if rule is not None:
    sample_options["guidance"] = guidance_rule(model, workdir,
                                               method=sample_options.get("method"), **rule)
  samples = generate(jax.random.key(seed), model, label_array, batch_size=batch_size,
                     progress=True, **sample_options)
  if not distributed.is_main():  # every process sampled; one writes
    return out, io.grid_path_beside(out)
  npz = io.write_npz(out, samples, label_array, overwrite)
  return npz, io.save_grid_beside(npz, samples, label_array)
