"""A trained (or converted) workdir as one object: `cfg_jax.load(workdir).sample(key, labels)`.

    import jax, cfg_jax
    model = cfg_jax.load("runs/digits")
    x0 = model.sample(jax.random.key(0), labels=[3, 3, 7], guidance_scale=3.0)

Autoguidance's weak model is another pipeline, e.g. an earlier (kept) step of the same run:

    weak = cfg_jax.pipeline.load_weak(model, "runs/digits", step=500)
    x0 = model.sample(key, labels, guidance=guidance.Autoguidance(2.0, weak.eps_fn))

A latent model (DiT on the Stable Diffusion VAE) also has `encode(images)` and
`decode(latents)`; its `sample` runs the sampler on latents and returns decoded images
(`decode=False`: the latents).

A guidance-distilled student (`guidance_distilled`, trained by `configs/digits_distill.py`)
takes the guidance scale as an input: `sample(key, labels, guidance_scale=w)` runs one pass
per step (`guidance.Distilled(w)`), and rules that need the teacher's passes are refused.

`load` restores only what sampling needs: the EMA parameters of the ε-network (and the
noisy classifier's parameters, when the workdir has one), restored partially into
abstract targets, with no random init and no optimizer state. The functional
`cfg_jax.sampling.sample` stays the core; `Pipeline.sample` fills in the model, the
schedule, the null label and the image shape.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.tree_util import Partial

from cfg_jax import checkpoints, errors, guidance, models, paths, sampling, schedules
from cfg_jax.models.dit import vae
from cfg_jax.sampling import guided

# What a classifier and a diffusion model must share for the classifier to guide it; the
# data set fixes the image shape and the number of classes.
_SHARED_SECTIONS = ("data.name", "diffusion.schedule", "diffusion.num_timesteps")


@flax.struct.dataclass  # a pytree of its two functions' parameters (replicated for sharding)
class LatentSpace:
  """The autoencoder a latent model works in, and the scale of its latents.

  The diffusion model sees (z − shift_factor)·scaling_factor, z the VAE's latent (diffusers'
  convention: 0.18215 for the SD VAE gives latents of about unit variance).
  """

  encoder_fn: Partial  # images (B, H, W, C) in [−1, 1] -> (mean, logvar) of q(z | x)
  decoder_fn: Partial  # z -> images
  scaling_factor: float = flax.struct.field(pytree_node=False)
  shift_factor: float = flax.struct.field(pytree_node=False)
  image_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)  # one decoded image

  def encode(self, images):
    """The diffusion model's latents of `images` (the posterior mean, scaled)."""
    mean, _ = _call(self.encoder_fn, jnp.asarray(images, jnp.float32))
    return vae.to_diffusion_latent(mean, self.scaling_factor, self.shift_factor)

  def decode(self, latents):
    """Images in [−1, 1] of latents in the diffusion model's scale; any leading axes."""
    latents = jnp.asarray(latents, jnp.float32)
    z = vae.from_diffusion_latent(latents.reshape(-1, *latents.shape[-3:]),
                                  self.scaling_factor, self.shift_factor)
    decoded = jnp.clip(_call(self.decoder_fn, z), -1.0, 1.0)
    return decoded.reshape(*latents.shape[:-3], *decoded.shape[1:])


@jax.jit
def _call(fn, x):
  return fn(x)  # compiled once per function (a Partial over its parameters) and shape


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
  latent: Optional[LatentSpace] = None  # a latent model's VAE; None: pixel space
  guidance_distilled: bool = False  # eps_fn(x_t, t, y, w): a student that takes w itself

  @classmethod
  def from_config(cls, config, network_fn, classifier_fn=None,
                  latent: Optional[LatentSpace] = None) -> "Pipeline":
    """A pipeline over the denoiser `network_fn(x_t, t, y)` and the classifier function of a
    model trained (or converted) with `config`; `latent` for a latent model."""
    info = models.describe(config)
    eps_fn, denoiser_fn = network_fn, None
    if info.learned_variance:  # the network returns ε and the variance values
      eps_fn, denoiser_fn = Partial(eps_channels, network_fn), network_fn
    return cls(eps_fn=eps_fn, schedule=schedules.from_config(config.diffusion),
               num_classes=info.num_classes, null_label=info.null_label,
               image_shape=info.image_shape, config=config, classifier_fn=classifier_fn,
               learned_variance=info.learned_variance, denoiser_fn=denoiser_fn,
               class_names=info.class_names, latent=latent,
               guidance_distilled=info.guidance_distilled)

  @property
  def output_shape(self) -> tuple[int, ...]:
    """The shape of one sample as `sample` returns it: a decoded image for a latent model."""
    return self.image_shape if self.latent is None else self.latent.image_shape

  def encode(self, images):
    """A latent model's latents of images in [−1, 1] (what `x_init` and the sampler see)."""
    return self._latent_space().encode(images)

  def decode(self, latents):
    """A latent model's images in [−1, 1] of latents (e.g. `sample(..., decode=False)`'s)."""
    return self._latent_space().decode(latents)

  def _latent_space(self) -> LatentSpace:
    if self.latent is None:
      raise errors.InputError("This model works in pixel space: it has no encode or "
                                       "decode.")
    return self.latent

  def sample(self, key, labels, *, decode: bool = True, **options):
    """`sampling.sample` with this model filled in; `options` are the sampler's keywords.

    The sampler's method, number of steps and η default to the config's `sampling`
    section. The classifier (if any) is passed unless `classifier_scale` is a plain 0, so
    unguided sampling compiles without it. A latent model samples latents (`x_init` is a
    latent; x0 is not clipped, since latents are not in [−1, 1]) and returns them decoded,
    or as they are with `decode=False`. A guidance-distilled student samples with
    `guidance_scale=w` (default 1, its conditional model) or `guidance=guidance.Distilled(w)`.
    """
    options = self._with_guidance_rule(options)
    defaults = self._sampler_defaults()
    if self.latent is not None:
      defaults.setdefault("clip_denoised", False)
    scale = options.get("classifier_scale", defaults.get("classifier_scale", 0.0))
    if not (isinstance(scale, (int, float)) and scale == 0):
      defaults["classifier_fn"] = self.classifier_fn
    network_fn = self.denoiser_fn if self.learned_variance else self.eps_fn
    samples = sampling.sample(key, network_fn, self.schedule, labels,
                              image_shape=self.image_shape, null_label=self.null_label,
                              num_classes=self.num_classes,
                              learned_variance=self.learned_variance, **{**defaults, **options})
    return self.latent.decode(samples) if self.latent is not None and decode else samples

  def _with_guidance_rule(self, options: dict) -> dict:
    """`options` with a student's `guidance_scale=w` as `guidance.Distilled(w)`; a rule the
    model cannot run (one needing the teacher's passes on a student, Distilled on any other
    model) is an InputError."""
    rule = options.get("guidance")
    if not self.guidance_distilled:
      if isinstance(rule, guidance.Distilled):
        raise errors.InputError("guidance.Distilled needs a guidance-distilled student "
                                "(config.model.guidance_embedding); guide this model with "
                                "guidance_scale or another rule.")
      return options
    if rule is None:
      scale = options.get("guidance_scale")
      rule = guidance.Distilled(1.0 if scale is None else scale)
      options = {**{k: v for k, v in options.items() if k != "guidance_scale"}, "guidance": rule}
    if not isinstance(rule, guidance.Distilled):
      raise errors.InputError(f"This model is a guidance-distilled student: it takes the "
                              f"guidance scale as an input (guidance_scale=w, or "
                              f"guidance.Distilled(w)); {type(rule).__name__} needs its "
                              f"teacher's passes, so sample the teacher for it.")
    warning = self._untrained_scale_warning(rule)
    if warning:  # allowed (it is the student's input), but never silently
      warnings.warn(warning, UserWarning, stacklevel=3)
    return options

  def _untrained_scale_warning(self, rule: guidance.Distilled) -> Optional[str]:
    """Why a student's scale is not one it learned (outside `distill.guidance_scale_range`),
    or None; decided on concrete values only (a traced scale is not checked)."""
    section = self.config.get("distill")
    scale = guided.concrete(rule.scale)
    if section is None or scale is None:
      return None
    low, high = section.guidance_scale_range
    # 0 is the student at ∅ (guided.distilled_eps_fn), which it learned at every w.
    outside = [float(w) for w in np.ravel(scale) if w != 0 and not low <= w <= high]
    if not outside:
      return None
    return (f"guidance scale {outside[0]:g} is outside [{low:g}, {high:g}], the range this "
            f"student was distilled on, so its ε there is extrapolated; sample the teacher, "
            f"or distill with --config.distill.guidance_scale_range covering it.")

  def check_options(self, **options) -> None:
    """Raises an InputError for sampler options (`sample`'s keywords) that cannot work with
    this model, before anything is sampled; `sampling.check_options` with the defaults."""
    options = {**self._sampler_defaults(), **options}
    sampling.check_options(self.schedule, **{name: options[name] for name in _SAMPLER_OPTIONS
                                             if name in options})

  def _sampler_defaults(self) -> dict:
    """The config's `sampling` section: method, num_steps, eta (and timestep_spacing,
    classifier_scale, clip_denoised and guided_channels where it sets them, as a converted
    checkpoint's does)."""
    section = self.config.sampling
    defaults = dict(method=section.method, num_steps=section.num_steps, eta=section.eta)
    for name in ("timestep_spacing", "classifier_scale", "clip_denoised", "guided_channels"):
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
  return Pipeline.from_config(config, eps_fn, classifier_fn, _load_latent(workdir, config))


def load_weak(main: Pipeline, workdir: str, step: Optional[int] = None,
              role: str = "weak") -> Pipeline:
  """A second model that guides `main`: autoguidance's weak model (`role="weak"`), e.g. an
  early kept step of the main run or a smaller or shorter run, or CFG's separate
  unconditional network (`role="unconditional"`, for `guidance.CFG(uncond_eps_fn=...)`);
  the EMA model of `workdir` at `step` (default: the latest). It must share the main model's
  data set (so image shape and classes) and noise schedule."""
  directory = paths.diffusion_checkpoints(workdir)
  saved = checkpoints.read_config(directory, step)
  diffs = checkpoints.config_differences(saved, main.config.to_dict(), _SHARED_SECTIONS)
  if diffs:
    raise checkpoints.CheckpointError(
        f"The {role} model in {directory} does not match the main model ({'; '.join(diffs)}); "
        "train it with the same data set and schedule.")
  other = Pipeline.from_config(*_load_eps(directory, step))  # its ε alone: no VAE needed
  if (other.image_shape, other.num_classes) != (main.image_shape, main.num_classes) or not (
      np.array_equal(other.schedule.alphas_cumprod, main.schedule.alphas_cumprod)):
    raise checkpoints.CheckpointError(f"The {role} model in {directory} has another image "
                                      "shape, classes or schedule than the main model.")
  if other.guidance_distilled:
    raise checkpoints.CheckpointError(f"The {role} model in {directory} is a guidance-distilled "
                                      "student, which needs w; use a model trained with "
                                      "configs/digits.py.")
  return other


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


def _load_latent(workdir: str, config) -> Optional[LatentSpace]:
  """The VAE of a latent model's workdir (its `latent` section), None for a pixel model."""
  section = config.get("latent")
  if section is None:
    return None
  graphdef, abstract_params = models.abstract(vae.AutoencoderKL, section)
  params = checkpoints.restore_subtree(paths.vae_checkpoints(workdir), "params", abstract_params)
  return latent_space(section, graphdef, params)


def latent_space(section, graphdef, params) -> LatentSpace:
  """The LatentSpace of the VAE `(graphdef, params)` with the config `section`."""
  return LatentSpace(Partial(vae.encode, graphdef, params), Partial(vae.decode, graphdef, params),
                     float(section.scaling_factor), float(section.shift_factor),
                     tuple(section.image_shape))
