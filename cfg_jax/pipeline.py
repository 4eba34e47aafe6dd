"""A trained workdir as one object: `cfg_jax.load(workdir).sample(key, labels, ...)`.

    import jax, cfg_jax
    model = cfg_jax.load("runs/digits")
    x0 = model.sample(jax.random.key(0), labels=[3, 3, 7], guidance_scale=3.0)

Autoguidance's weak model is another pipeline, e.g. an earlier (kept) step of the same run:

    weak = cfg_jax.pipeline.load_weak(model, "runs/digits", step=500)
    x0 = model.sample(key, labels, guidance=guidance.Autoguidance(2.0, weak.eps_fn))

`load` restores only what sampling needs: the EMA parameters of the ε-network (and the
noisy classifier's parameters, when the workdir has one), restored partially into
abstract targets, with no random init and no optimizer state. The functional
`cfg_jax.sampling.sample` stays the core; `Pipeline.sample` fills in the model, the
schedule, the null label and the image shape.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.tree_util import Partial

from cfg_jax import checkpoints, data, errors, models, sampling, schedules
from cfg_jax import guidance as guidance_lib
from cfg_jax.models import unet
from cfg_jax.train import classifier as classifier_training
from cfg_jax.train import diffusion as diffusion_training

# What a classifier and a diffusion model must share for the classifier to guide it; the
# data set fixes the image shape and the number of classes.
_SHARED_SECTIONS = ("data.name", "diffusion.schedule", "diffusion.num_timesteps")


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A trained model with everything sampling needs."""

  eps_fn: Partial  # ε(x_t, t, y) over the EMA parameters
  schedule: schedules.Schedule
  num_classes: int
  null_label: int  # == num_classes: the label id that means "no label"
  image_shape: tuple[int, ...]
  config: ml_collections.ConfigDict
  classifier_fn: Optional[Partial] = None  # p_φ(y | x_t, t) logits, if trained

  @classmethod
  def from_config(cls, config, eps_fn, classifier_fn=None) -> "Pipeline":
    """A pipeline over given ε- and classifier functions of a model trained with `config`."""
    spec = data.spec(config.data.name)
    return cls(eps_fn=eps_fn, schedule=schedules.from_config(config.diffusion),
               num_classes=spec.num_classes, null_label=spec.num_classes,
               image_shape=tuple(spec.image_shape), config=config, classifier_fn=classifier_fn)

  def sample(self, key, labels, **options):
    """`sampling.sample` with this model filled in; `options` are the sampler's keywords.

    The sampler's method, number of steps and η default to the config's `sampling`
    section. The classifier (if any) is passed unless `classifier_scale` is a plain 0, so
    unguided sampling compiles without it.
    """
    self._warn_if_unguidable(options)
    defaults = dict(method=self.config.sampling.method, num_steps=self.config.sampling.num_steps,
                    eta=self.config.sampling.eta)
    scale = options.get("classifier_scale", 0.0)
    if not (isinstance(scale, (int, float)) and scale == 0):
      defaults["classifier_fn"] = self.classifier_fn
    return sampling.sample(key, self.eps_fn, self.schedule, labels,
                           image_shape=self.image_shape, null_label=self.null_label,
                           num_classes=self.num_classes, **{**defaults, **options})

  def _warn_if_unguidable(self, options) -> None:
    """With p_uncond = 0 the null label was never trained, so any guidance that reads
    ε(x, t, ∅) (γ ≠ 1, a swept scale, APG, CFG++) mixes in garbage."""
    if self.config.diffusion.get("p_uncond", 1.0) != 0:
      return
    rule = options.get("guidance")
    if rule is None:
      scale = options.get("guidance_scale")
      if scale is None:
        return  # γ = 1: the conditional model alone
      try:
        rule = guidance_lib.CFG(scale=scale)
      except errors.UserError:
        return  # the sampler names the bad scale
    if isinstance(rule, guidance_lib.RULES) and sampling.uses_null_label(rule):
      logging.warning("%s needs the unconditional model, but this one was trained with "
                      "p_uncond=0 (the null label never trained), so expect garbage; use "
                      "guidance_scale=1 (the conditional model alone).", _describe(rule))


def _describe(rule) -> str:
  """The guidance as a user writes it, e.g. "guidance_scale=3" or "APG(scale=[1.0, 2.0])"."""
  if isinstance(rule.scale, jax.core.Tracer):
    shown = "traced"
  else:
    scale = np.asarray(rule.scale)
    shown = f"{float(scale):g}" if scale.ndim == 0 else str(scale.tolist())
  if isinstance(rule, guidance_lib.CFG) and rule.weight_schedule == "constant":
    return f"guidance_scale={shown}"
  return f"{type(rule).__name__}(scale={shown})"


def load(workdir: str, classifier_workdir: Optional[str] = None,
         step: Optional[int] = None) -> Pipeline:
  """The EMA model of `workdir` at `step` (default: the latest), with the noisy classifier
  of `classifier_workdir` (default: the same workdir) when one has been trained there."""
  config, eps_fn = _load_eps(os.path.join(workdir, diffusion_training.CHECKPOINT_DIR), step)
  classifier_fn = _load_classifier(classifier_workdir or workdir, config,
                                   required=classifier_workdir is not None)
  return Pipeline.from_config(config, eps_fn, classifier_fn)


def load_weak(main: Pipeline, workdir: str, step: Optional[int] = None) -> Pipeline:
  """Autoguidance's weak model: the EMA model of `workdir` at `step` (default: the latest),
  e.g. an early kept step of the main run or a smaller or shorter run. It must share the
  main model's data set (so image shape and classes) and noise schedule."""
  directory = os.path.join(workdir, diffusion_training.CHECKPOINT_DIR)
  saved = checkpoints.read_config(directory, step)
  diffs = checkpoints.config_differences(saved, main.config.to_dict(), _SHARED_SECTIONS)
  if diffs:
    raise checkpoints.CheckpointError(
        f"The weak model in {directory} does not match the main model ({'; '.join(diffs)}); "
        "train it with the same data set and schedule.")
  weak = Pipeline.from_config(*_load_eps(directory, step))
  if (weak.image_shape, weak.num_classes) != (main.image_shape, main.num_classes) or not (
      np.array_equal(weak.schedule.alphas_cumprod, main.schedule.alphas_cumprod)):
    raise checkpoints.CheckpointError(f"The weak model in {directory} has another image "
                                      "shape, classes or schedule than the main model.")
  return weak


def _load_eps(directory: str, step: Optional[int]):
  """(config, ε-function over the EMA parameters) of the checkpoint of `step`."""
  config = ml_collections.ConfigDict(checkpoints.read_config(directory, step))
  graphdef, abstract_params = models.abstract(unet.UNet, models.model_config(config))
  ema_params = checkpoints.restore_subtree(directory, "ema_params", abstract_params, step)
  return config, Partial(models.apply, graphdef, ema_params)


def _load_classifier(workdir: str, diffusion_config, required: bool) -> Optional[Partial]:
  directory = os.path.join(workdir, classifier_training.CHECKPOINT_DIR)
  if not required and not os.path.isdir(directory):
    return None
  config = checkpoints.read_config(directory)
  diffs = checkpoints.config_differences(config, diffusion_config.to_dict(), _SHARED_SECTIONS)
  if diffs:
    raise checkpoints.CheckpointError(
        f"The classifier in {directory} was not trained for this diffusion model "
        f"({'; '.join(diffs)}); train one with the same data set and schedule.")
  config = ml_collections.ConfigDict(config)
  graphdef, abstract_params = models.abstract(
      unet.NoisyClassifier, models.model_config(config, config.classifier.model))
  params = checkpoints.restore_subtree(directory, "params", abstract_params)
  return Partial(models.apply, graphdef, params)
