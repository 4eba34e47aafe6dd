"""The main job (`python train.py`): the diffusion model, then the noisy classifier, then
sample grids, with a short account on the console and the details in `workdir/train.log`.
A config with a `distill` section trains a guidance-distilled student of its teacher in place
of the diffusion model (`cfg_jax.train.distill`)."""

from __future__ import annotations

import contextlib
import os
import time
from functools import partial
from typing import Optional

import jax
import numpy as np
from jax.tree_util import Partial

from cfg_jax import (checkpoints, data, distributed, errors, images, models, paths, pipeline,
                     sharded_sampling)
from cfg_jax.app import config_checks, console, files, locking, sample_job
from cfg_jax.train import classifier, denoiser, distill, latent


def sample_grid(path: str, model: pipeline.Pipeline, seed: int, **sample_options):
  """Samples `samples_per_class` images of every class; one row per class. Returns them."""
  per_class = model.config.sampling.samples_per_class
  labels = np.repeat(np.arange(model.num_classes), per_class)
  samples = images.to_uint8(sharded_sampling.sample_sharded(jax.random.key(seed), model, labels,
                                                            **sample_options))
  if distributed.is_main():
    files.save_grid(path, samples, num_rows=model.num_classes)
  return samples, labels


def train_and_evaluate(config, workdir: str) -> None:
  """Trains both networks in `workdir` (resuming where it stopped) and writes the grids.

  The config is checked first (values, then the device count, then, read-only, against the
  workdir's checkpoints), so a bad one changes no file. The workdir is then locked: a
  second run on it is refused. A workdir made for this run and left with nothing but the
  lock and the log by a `UserError` is removed again.
  """
  started = time.perf_counter()
  config_checks.validate(config)
  config = _with_vae_config(config)
  if config.get("distill") is not None:  # the teacher checked, its step recorded
    config = distill.resolve_teacher(config)
  config_checks.check_devices(config, jax.device_count())
  paths.check_folder_usable(workdir, f"the workdir {workdir}", "choose another --workdir")
  for directory, sections in (
      (paths.diffusion_checkpoints(workdir), _diffusion_trainer(config).state_sections(config)),
      (paths.classifier_checkpoints(workdir), classifier.state_sections(config))):
    checkpoints.check_resumable(directory, config.to_dict(), sections)
  created = _first_missing(workdir)
  with contextlib.ExitStack() as stack:
    if distributed.is_main():  # the processes of one job share the workdir: 0 holds the lock
      stack.enter_context(locking.exclusive(paths.lock_file(workdir),
                                            what=f"workdir {workdir}"))
    # From here on this run holds the lock, so the clean-up below can only ever remove its
    # own start-up files, never those of a run that holds the workdir.
    try:
      paths.make_folder(workdir, "choose another --workdir")
      with console.logging_to(paths.log_file(workdir, distributed.process_index())):
        _train_and_evaluate(config, workdir, started)
    except errors.UserError:
      if created is not None and distributed.is_main():
        _remove_if_only_startup_files(workdir, created)
      raise


def _with_vae_config(config):
  """A latent model's config with its `latent` section completed from the VAE it names
  (`latent.vae_workdir`): the VAE's own config, saved with every checkpoint."""
  section = config.get("latent")
  if section is None:
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.latent = latent.vae_section(section.vae_workdir)
    config.latent.image_shape = data.spec(config.data.name).image_shape
  return config


def _diffusion_trainer(config):
  """The module that trains the ε-network: `distill` for a student, else `denoiser`."""
  return denoiser if config.get("distill") is None else distill


def _first_missing(path: str) -> Optional[str]:
  """The outermost folder of `path` that does not exist yet (None if `path` exists)."""
  path, missing = os.path.abspath(path), None
  while not os.path.lexists(path):
    path, missing = os.path.dirname(path), path
  return missing


def _remove_if_only_startup_files(workdir: str, created: str) -> None:
  """Removes `workdir` and the folders made for it, up to `created`, if it holds only the
  lock and the log: a failed first run then leaves no trace beside its error message."""
  workdir = os.path.abspath(workdir)
  if not os.path.isdir(workdir) or not set(os.listdir(workdir)) <= {paths.LOCK, paths.LOG}:
    return
  try:
    for name in os.listdir(workdir):
      os.remove(os.path.join(workdir, name))
    folder = workdir
    while True:
      os.rmdir(folder)  # fails, and so stops, on a folder someone else has put files in
      if folder == created:
        return
      folder = os.path.dirname(folder)
  except OSError:
    return  # best effort: the user's error message matters more than a leftover folder


def _train_and_evaluate(config, workdir: str, started: float) -> None:
  devices = jax.devices()
  train_split = data.open_split(config.data.name, "train", config.data.data_dir or None,
                                config.data.download, config.data.get("streaming", False))
  latent_space = None
  if config.get("latent") is not None:
    latent_space, train_split = _encoded(config, workdir, train_split)
  hosts = f" on {distributed.process_count()} hosts" if distributed.process_count() > 1 else ""
  console.say(f"Training on {config.data.name} ({len(train_split):,} images) with "
              f"{len(devices)} {devices[0].platform.upper()} device(s){hosts}; outputs in "
              f"{workdir}")
  if config.get("distill") is not None:
    section = config.distill
    low, high = section.guidance_scale_range
    console.say(f"Distilling the guided teacher of {section.teacher_workdir} (step "
                f"{section.teacher_step}) into a student taking γ in [{low:g}, {high:g}].")
  graphdef, state = _diffusion_trainer(config).train(config, workdir, train_split)
  console.say(f"Diffusion model: {models.count_params(state.params):,} parameters, "
              f"{int(state.step)} steps of batch {config.train.batch_size}.")
  classifier_fn = None
  if config.classifier.num_steps > 0:
    classifier_fn, quarters = classifier.train(config, workdir, train_split)
    console.say("Noisy classifier test accuracy by noise quarter (low → high t): "
                + ", ".join(f"{a:.3f}" for a in quarters))
  model = pipeline.Pipeline.from_config(config, Partial(models.apply, graphdef, state.ema_params),
                                        classifier_fn, latent_space)
  if model.null_label is None:
    console.say("No null label (diffusion.p_uncond=0): the grids guide by independent "
                "condition guidance, ICG, whose γ = 0 is the model at random labels.")
  free_guidance = partial(sample_job.free_guidance, model)
  grids = {}
  for scale in config.sampling.guidance_scales:
    path = paths.sample_grid(workdir, "cfg", scale)
    grids[path] = sample_grid(path, model, config.seed, **free_guidance(scale))
  if classifier_fn is not None:
    for scale in config.sampling.classifier_scales:
      path = paths.sample_grid(workdir, "classifier", scale)
      grids[path] = sample_grid(path, model, config.seed, **free_guidance(0.0),
                                classifier_scale=scale)
  console.say("Sample grids (one row per class): " + ", ".join(map(os.path.basename, grids)))
  console.say(f"Done in {time.perf_counter() - started:.0f} s{_judged(grids, config, workdir)}. "
              f"Sample more with: python sample.py --workdir {workdir}")


def _encoded(config, workdir: str, split):
  """(the LatentSpace, the split encoded by it) of a latent model, whose VAE is copied into
  the workdir once so the trained model loads on its own."""
  section = config.latent
  graphdef, params = latent.restore_vae(section.vae_workdir, section)
  target = paths.vae_checkpoints(workdir)
  if distributed.is_main() and checkpoints.latest_step(target) is None:
    manager = checkpoints.manager(target, max_to_keep=1)
    checkpoints.save(manager, 0, {"params": params}, config.to_dict())
    manager.wait_until_finished()
  console.say(f"Encoding {len(split):,} images with the VAE of {section.vae_workdir}.")
  return pipeline.latent_space(section, graphdef, params), latent.encode_split(
      split, graphdef, params)


def _judged(grids: dict, config, workdir: str) -> str:
  """", γ = 3 accuracy 0.99 (evaluation network)" when that network is at hand, else ""."""
  from cfg_jax.evaluation import evalnet

  path = next((p for p in grids if p == paths.sample_grid(workdir, "cfg", 3)), None)
  path = path if distributed.is_main() else None  # the others may lack the network
  net = evalnet.load(config.data.name) if path else None
  if net is None:
    return ""
  samples, labels = grids[path]
  logits, _ = net(samples)
  return f", γ = 3 accuracy {np.mean(np.argmax(logits, -1) == labels):.2f} (evaluation network)"
