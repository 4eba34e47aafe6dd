"""Network definitions (Flax NNX)."""

import ml_collections

from cfg_jax import data


def model_config(config, section=None) -> ml_collections.ConfigDict:
  """A model section (default `config.model`) plus what the data set fixes."""
  spec = data.spec(config.data.name)
  section = config.model if section is None else section
  out = ml_collections.ConfigDict(section.to_dict())
  out.image_shape = spec.image_shape
  out.num_classes = spec.num_classes
  return out
