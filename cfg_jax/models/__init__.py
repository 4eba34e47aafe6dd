"""Every network of the project (Flax NNX), and how they become pure functions.

`unet` holds the digits ε-network and noisy classifier, `eval_cnn` the evaluation network;
each imported family has a folder with its network, its weight port and its config mapping
(`adm/`: OpenAI's ADM UNet and noisy classifier; `dit/`: DiT and the Stable Diffusion VAE).
A workdir's `config.model.family` names its family ("unet" when absent); `denoiser` and
`classifier` give the network a workdir holds, and `describe` what sampling needs to know.
A model is used as `(graphdef, params)`: `params` is a plain nested dict of arrays (what
optimizers, EMA and checkpoints see) and `apply(graphdef, params, *inputs)` runs it, so
`jax.tree_util.Partial(apply, graphdef, params)` is an ε-function whose parameters stay
traced (a new checkpoint never recompiles the sampler).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from cfg_jax import data, errors

FAMILIES = ("unet", "adm", "dit")


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """What a sampler needs to know of a denoiser besides its parameters."""

  image_shape: tuple[int, ...]
  num_classes: int
  null_label: Optional[int]  # the label id of ε(x, t, ∅); None: the model has no such pass
  learned_variance: bool = False  # the output holds ε and the variance values (2C channels)
  class_names: Optional[tuple[str, ...]] = None
  # ε(x_t, t, y, w): a guidance-distilled student that takes the guidance scale w itself
  guidance_distilled: bool = False


def family(section) -> str:
  name = section.get("family", "unet")
  if name not in FAMILIES:
    raise errors.ConfigError(f"Unknown model family {name!r}; one of {FAMILIES}.")
  return name


def describe(config) -> ModelInfo:
  """The ModelInfo of the denoiser a workdir's config describes (of its latents, for a model
  trained on a VAE's latents)."""
  if family(config.model) == "dit":
    from cfg_jax.data import class_names

    net = dit_config(config)
    names = class_names.imagenet() if net.num_classes == 1000 else None
    return ModelInfo(tuple(net.image_shape), net.num_classes,
                     net.num_classes if net.class_dropout_prob > 0 else None,
                     bool(net.learn_sigma), names)
  if family(config.model) == "adm":
    from cfg_jax.data import class_names
    from cfg_jax.models.adm import presets

    net = presets.model_config(config.model.flags.to_dict())
    return ModelInfo(tuple(net.image_shape), presets.NUM_CLASSES, None,
                     net.out_channels == 2 * net.in_channels, class_names.imagenet())
  spec = data.spec(config.data.name)
  # Trained without conditioning dropout, the null row of the class embedding never learned ∅.
  trained_null = config.diffusion.p_uncond > 0
  return ModelInfo(tuple(spec.image_shape), spec.num_classes,
                   spec.num_classes if trained_null else None,
                   guidance_distilled=bool(config.model.get("guidance_embedding", False)))


def denoiser(config):
  """(network class, its config) of the denoiser ε_θ a workdir's config describes."""
  if family(config.model) == "dit":
    from cfg_jax.models.dit import network

    return network.DiT, dit_config(config)
  if family(config.model) == "adm":
    from cfg_jax.models.adm import network, presets

    return network.UNetModel, presets.model_config(config.model.flags.to_dict(),
                                                 dtype=config.model.get("dtype", "float32"))
  from cfg_jax.models import unet

  return unet.UNet, model_config(config)


def classifier(config):
  """(network class, its config) of the noisy classifier p_φ(y | x_t) of a workdir's config."""
  section = config.classifier.model
  if family(section) == "adm":
    from cfg_jax.models.adm import network, presets

    return network.EncoderUNetModel, presets.classifier_config(
        section.flags.to_dict(), dtype=section.get("dtype", "float32"))
  from cfg_jax.models import unet

  return unet.NoisyClassifier, model_config(config, section)


def model_config(config, section=None) -> ml_collections.ConfigDict:
  """A model section (default `config.model`) plus what the data set fixes."""
  spec = data.spec(config.data.name)
  section = config.model if section is None else section
  out = ml_collections.ConfigDict(section.to_dict())
  out.image_shape = spec.image_shape
  out.num_classes = spec.num_classes
  return out


# DiT's own conventions (`cfg_jax.models.dit.network`) for a DiT trained here.
DIT_TRAINING_DEFAULTS = dict(mlp_ratio=4.0, learn_sigma=False, freq_shift=0.0,
                             mlp_norm_eps=1e-6, per_block_embedder=False, dropout=0.0)


def dit_config(config) -> ml_collections.ConfigDict:
  """The DiT network config of a workdir's `model` section. A converted model's section holds
  its latent shape and classes; a trained one's come from the data set (pixel space) or
  from the data set through the VAE of the `latent` section, and its null label row from
  the conditioning dropout."""
  net = ml_collections.ConfigDict(config.model.to_dict())
  del net.family
  if net.get("image_shape") is None:
    spec = data.spec(config.data.name)
    net.image_shape = tuple(spec.image_shape)
    if config.get("latent") is not None:
      net.image_shape = latent_shape(spec.image_shape, config.latent)
    net.num_classes = spec.num_classes
    net.class_dropout_prob = float(config.diffusion.p_uncond)
    for name, value in DIT_TRAINING_DEFAULTS.items():
      if name not in net:
        net[name] = value
  return net


def latent_shape(image_shape, vae_config) -> tuple[int, int, int]:
  """The latent (h, w, c) of an image of `image_shape` through the VAE of `vae_config`."""
  factor = 2 ** (len(vae_config.block_out_channels) - 1)
  height, width, _ = image_shape
  if height % factor or width % factor:
    raise errors.ConfigError(f"Images of {height}×{width} do not divide by the VAE's "
                             f"downsampling factor {factor}.")
  return (height // factor, width // factor, vae_config.latent_channels)


def split_params(model: nnx.Module):
  """(graphdef, params as a plain nested dict) of a model that holds only parameters."""
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def create(model_cls, *args, seed):
  """A freshly initialised model as (graphdef, params); `seed` is an int or a key.

  The initialisation runs as one program compiled without optimisation, since it runs once:
  eagerly each of its hundreds of small ops compiles on its own, and XLA's optimising
  compile of the random-number code is slow too (default UNet, 2-core CPU: 7.7 s eager,
  4.7 s optimised, 1.9 s unoptimised).
  """
  graphdef, _ = abstract(model_cls, *args)
  init = jax.jit(lambda: split_params(model_cls(*args, rngs=nnx.Rngs(seed)))[1])
  params = init.lower().compile(compiler_options={"xla_backend_optimization_level": 0})()
  return graphdef, params


def abstract(model_cls, *args):
  """(graphdef, params of jax.ShapeDtypeStruct): the structure without initialising.

  The restore target of a checkpoint: no random init, no memory for weights.
  """
  return split_params(nnx.eval_shape(lambda: model_cls(*args, rngs=nnx.Rngs(0))))


def apply(graphdef, params, *inputs, **kwargs):
  """Runs the model `(graphdef, params)` as a pure function of its parameters."""
  return nnx.merge(graphdef, params)(*inputs, **kwargs)


def cast_floats(tree, dtype):
  """Every floating-point array of `tree` in `dtype`; integer arrays (t, y), keys and Python
  scalars as they are."""
  def cast(x):
    floating = hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)
    return x.astype(dtype) if floating else x

  return jax.tree_util.tree_map(cast, tree)


def apply_in_dtype(graphdef, params, *inputs, dtype, **kwargs):
  """`apply` computing in `dtype` (e.g. bfloat16) from float32 `params`, the master weights
  that the optimizer updates (gradients pass back through the cast); float outputs return
  as float32. With dtype float32 it is `apply`."""
  if jnp.dtype(dtype) == jnp.float32:
    return apply(graphdef, params, *inputs, **kwargs)
  out = apply(graphdef, cast_floats(params, dtype), *cast_floats(inputs, dtype), **kwargs)
  return cast_floats(out, jnp.float32)


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
