"""A trained (or converted) workdir as one object: `cfg_jax.load(workdir).sample(key, labels)`.

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

import ml_collections
import numpy as np
from jax.tree_util import Partial

from cfg_jax import checkpoints, models, paths, sampling, schedules

# What a classifier and a diffusion model must share for the classifier to guide it; the
# data set fixes the image shape and the number of classes.
_SHARED_SECTIONS = ("data.name", "diffusion.schedule", "diffusion.num_timesteps")


@dataclasses.dataclass(frozen=True)
class Pipeline:
  """A trained model with everything sampling needs."""

  eps_fn: Partial  # ε(x_t, t, y) over the EMA parameters
  schedule: schedules.Schedule
  num_classes: int
  null_label: Optional[int]  # the label id that means "no label"; None: the model has none
  image_shape: tuple[int, ...]
  config: ml_collections.ConfigDict
  classifier_fn: Optional[Partial] = None  # p_φ(y | x_t, t) logits, if trained
  learned_variance: bool = False  # the network also predicts the variance (learn_sigma)
  denoiser_fn: Optional[Partial] = None  # with learned_variance: ε and the variance values
  class_names: Optional[tuple[str, ...]] = None  # for labels given by name

  @classmethod
  def from_config(cls, config, network_fn, classifier_fn=None) -> "Pipeline":
    """A pipeline over the denoiser `network_fn(x_t, t, y)` and the classifier function of a
    model trained (or converted) with `config`."""
    info = models.describe(config)
    eps_fn, denoiser_fn = network_fn, None
    if info.learned_variance:  # the network returns ε and the variance values
      eps_fn, denoiser_fn = Partial(eps_channels, network_fn), network_fn
    return cls(eps_fn=eps_fn, schedule=schedules.from_config(config.diffusion),
               num_classes=info.num_classes, null_label=info.null_label,
               image_shape=info.image_shape, config=config, classifier_fn=classifier_fn,
               learned_variance=info.learned_variance, denoiser_fn=denoiser_fn,
               class_names=info.class_names)

  def sample(self, key, labels, **options):
    """`sampling.sample` with this model filled in; `options` are the sampler's keywords.

    The sampler's method, number of steps and η default to the config's `sampling`
    section. The classifier (if any) is passed unless `classifier_scale` is a plain 0, so
    unguided sampling compiles without it.
    """
    defaults = self._sampler_defaults()
    scale = options.get("classifier_scale", defaults.get("classifier_scale", 0.0))
    if not (isinstance(scale, (int, float)) and scale == 0):
      defaults["classifier_fn"] = self.classifier_fn
    network_fn = self.denoiser_fn if self.learned_variance else self.eps_fn
    return sampling.sample(key, network_fn, self.schedule, labels,
                           image_shape=self.image_shape, null_label=self.null_label,
                           num_classes=self.num_classes, learned_variance=self.learned_variance,
                           **{**defaults, **options})

  def check_options(self, **options) -> None:
    """Raises an InputError for sampler options (`sample`'s keywords) that cannot work with
    this model, before anything is sampled; `sampling.check_options` with the defaults."""
    options = {**self._sampler_defaults(), **options}
    sampling.check_options(self.schedule, **{name: options[name] for name in _SAMPLER_OPTIONS
                                             if name in options})

  def _sampler_defaults(self) -> dict:
    """The config's `sampling` section: method, num_steps, eta (and timestep_spacing and
    classifier_scale where it sets them, as a converted checkpoint's does)."""
    section = self.config.sampling
    defaults = dict(method=section.method, num_steps=section.num_steps, eta=section.eta)
    for name in ("timestep_spacing", "classifier_scale"):
      if section.get(name) is not None:
        defaults[name] = section[name]
    return defaults


def eps_channels(network_fn, x_t, t, y):
  """ε alone: the first half of the channels of a network that also predicts the variance."""
  return network_fn(x_t, t, y)[..., :x_t.shape[-1]]


_SAMPLER_OPTIONS = ("method", "num_steps", "eta", "timestep_spacing", "dynamic_threshold")


def load(workdir: str, classifier_workdir: Optional[str] = None,
         step: Optional[int] = None) -> Pipeline:
  """The EMA model of `workdir` at `step` (default: the latest), with the noisy classifier
  of `classifier_workdir` (default: the same workdir) when one has been trained there."""
  config, eps_fn = _load_eps(paths.diffusion_checkpoints(workdir), step)
  classifier_fn = _load_classifier(classifier_workdir or workdir, config,
                                   required=classifier_workdir is not None)
  return Pipeline.from_config(config, eps_fn, classifier_fn)


def load_weak(main: Pipeline, workdir: str, step: Optional[int] = None) -> Pipeline:
  """Autoguidance's weak model: the EMA model of `workdir` at `step` (default: the latest),
  e.g. an early kept step of the main run or a smaller or shorter run. It must share the
  main model's data set (so image shape and classes) and noise schedule."""
  directory = paths.diffusion_checkpoints(workdir)
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
  graphdef, abstract_params = models.abstract(*models.denoiser(config))
  ema_params = checkpoints.restore_subtree(directory, "ema_params", abstract_params, step)
  return config, Partial(models.apply, graphdef, ema_params)


def _load_classifier(workdir: str, diffusion_config, required: bool) -> Optional[Partial]:
  directory = paths.classifier_checkpoints(workdir)
  if not required and not os.path.isdir(directory):
    return None
  config = checkpoints.read_config(directory)
  diffs = checkpoints.config_differences(config, diffusion_config.to_dict(), _SHARED_SECTIONS)
  if diffs:
    raise checkpoints.CheckpointError(
        f"The classifier in {directory} was not trained for this diffusion model "
        f"({'; '.join(diffs)}); train one with the same data set and schedule.")
  config = ml_collections.ConfigDict(config)
  graphdef, abstract_params = models.abstract(*models.classifier(config))
  params = checkpoints.restore_subtree(directory, "params", abstract_params)
  return Partial(models.apply, graphdef, params)
