"""guided-diffusion PyTorch state dicts ↔ params of `network.UNetModel` / `EncoderUNetModel`.

`name_map(config)` is the one-to-one table torch name → our parameter path, built from the
same layer layout as the modules (`network.unet_layout`, `network.encoder_layout`) without
building a network; each entry (`entries`) also holds the PyTorch shape and layout:

  conv2d   OIHW → HWIO                      conv1d   (O, I, 1) → (I, O)   (1-d conv, kernel 1)
  conv1x1  (O, I, 1, 1) → (I, O)            linear   (O, I) → (I, O)
  pos      (C, T) → (T, C)                  copy     biases, GroupNorm weights, embeddings

`to_params` converts a state dict (name → numpy array or torch tensor) into the plain nested
dict that `models.apply` takes, after checking that its keys and shapes are exactly the
config's (`check_state_dict`: one-line InputError naming the first key that differs);
`to_state_dict` is the inverse. Nothing here needs torch, except
`read_torch_state_dict` for `.pt` files, which imports it when called.
"""

from __future__ import annotations

import pathlib
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from cfg_jax import errors
from cfg_jax.models.adm import network


class Entry(NamedTuple):
  torch_name: str
  path: tuple  # keys into the nested params dict
  kind: str
  shape: tuple  # in PyTorch's layout


def _conv(torch_prefix, path, shape, kind="conv2d"):
  """Weight and bias of a conv / linear layer; `shape` is the torch weight's."""
  return [Entry(f"{torch_prefix}.weight", path + ("kernel",), kind, shape),
          Entry(f"{torch_prefix}.bias", path + ("bias",), "copy", shape[:1])]


def _norm(torch_prefix, path, channels):
  return [Entry(f"{torch_prefix}.weight", path + ("scale",), "copy", (channels,)),
          Entry(f"{torch_prefix}.bias", path + ("bias",), "copy", (channels,))]


def _layer_entries(layer: network.Layer, config, torch_prefix, path):
  """The parameters of one layer of a TimestepEmbedSequential block."""
  ch, out = layer.channels, layer.out_channels
  if layer.kind == "conv":
    return _conv(torch_prefix, path, (out, ch, 3, 3))
  if layer.kind == "res":
    emb = (2 if config.use_scale_shift_norm else 1) * out
    entries = (_norm(f"{torch_prefix}.in_layers.0", path + ("in_norm",), ch)
               + _conv(f"{torch_prefix}.in_layers.2", path + ("in_conv",), (out, ch, 3, 3))
               + _conv(f"{torch_prefix}.emb_layers.1", path + ("emb_proj",),
                       (emb, 4 * config.model_channels), "linear")
               + _norm(f"{torch_prefix}.out_layers.0", path + ("out_norm",), out)
               + _conv(f"{torch_prefix}.out_layers.3", path + ("out_conv",), (out, out, 3, 3)))
    if ch != out:
      entries += _conv(f"{torch_prefix}.skip_connection", path + ("skip",), (out, ch, 1, 1))
    return entries
  if layer.kind == "attn":
    return (_norm(f"{torch_prefix}.norm", path + ("norm",), ch)
            + _conv(f"{torch_prefix}.qkv", path + ("qkv",), (3 * ch, ch, 1), "conv1d")
            + _conv(f"{torch_prefix}.proj_out", path + ("proj_out",), (ch, ch, 1), "conv1d"))
  if layer.resample != "conv":
    return []  # average pool, or nearest upsampling without a conv
  name = "op" if layer.kind == "down" else "conv"
  return _conv(f"{torch_prefix}.{name}", path + (name,), (out, ch, 3, 3))


def _blocks(blocks, config, torch_prefix, path):
  return [entry for i, block in enumerate(blocks) for j, layer in enumerate(block)
          for entry in _layer_entries(layer, config, f"{torch_prefix}.{i}.{j}", path + (i, j))]


def _middle(layers, config):
  return [entry for j, layer in enumerate(layers)
          for entry in _layer_entries(layer, config, f"middle_block.{j}", ("middle_block", j))]


def _time_embed(config):
  ch = config.model_channels
  return (_conv("time_embed.0", ("time_embed", "fc1"), (4 * ch, ch), "linear")
          + _conv("time_embed.2", ("time_embed", "fc2"), (4 * ch, 4 * ch), "linear"))


def entries(config) -> list[Entry]:
  """Every parameter of the network of `config`, in guided-diffusion's state-dict order."""
  emb = 4 * config.model_channels
  if network.network_class(config) is network.UNetModel:
    inputs, middle, outputs = network.unet_layout(config)
    out = _time_embed(config)
    if config.class_cond:
      out.append(Entry("label_emb.weight", ("label_emb", "embedding"), "copy",
                       (config.num_classes, emb)))
    out += _blocks(inputs, config, "input_blocks", ("input_blocks",))
    out += _middle(middle, config)
    ch = outputs[-1][0].out_channels
    return (out + _blocks(outputs, config, "output_blocks", ("output_blocks",))
            + _norm("out.0", ("out_norm",), ch)
            + _conv("out.2", ("out_conv",), (config.out_channels, ch, 3, 3)))
  inputs, middle, ds = network.encoder_layout(config)
  out = _time_embed(config) + _blocks(inputs, config, "input_blocks", ("input_blocks",))
  out += _middle(middle, config)
  ch, classes = middle[-1].out_channels, config.out_channels
  if config.pool == "attention":
    pool = ("attention_pool",)
    tokens = (config.image_size // ds) ** 2 + 1
    return (out + _norm("out.0", ("out_norm",), ch)
            + [Entry("out.2.positional_embedding", pool + ("positional_embedding",), "pos",
                     (ch, tokens))]
            + _conv("out.2.qkv_proj", pool + ("qkv_proj",), (3 * ch, ch, 1), "conv1d")
            + _conv("out.2.c_proj", pool + ("c_proj",), (classes, ch, 1), "conv1d"))
  if config.pool == "adaptive":
    return (out + _norm("out.0", ("out_norm",), ch)
            + _conv("out.3", ("out_proj",), (classes, ch, 1, 1), "conv1x1"))
  features = sum(block[-1].out_channels for block in inputs) + ch
  out += _conv("out.0", ("hidden",), (2048, features), "linear")
  if config.pool == "spatial":
    return out + _conv("out.2", ("out_proj",), (classes, 2048), "linear")
  return (out + _norm("out.1", ("hidden_norm",), 2048)
          + _conv("out.3", ("out_proj",), (classes, 2048), "linear"))


def name_map(config) -> dict[str, tuple]:
  """torch state-dict name → path of our parameter (e.g. ("input_blocks", 1, 0, "in_conv",
  "kernel")), one to one."""
  return {entry.torch_name: entry.path for entry in entries(config)}


def _from_torch(kind, array):
  if kind == "conv2d":
    return array.transpose(2, 3, 1, 0)
  if kind in ("conv1d", "conv1x1", "linear"):
    return array.reshape(array.shape[:2]).T
  if kind == "pos":
    return array.T
  return array


def _from_torch_shape(kind, shape):
  if kind == "conv2d":
    return (shape[2], shape[3], shape[1], shape[0])
  if kind in ("conv1d", "conv1x1", "linear"):
    return (shape[1], shape[0])
  if kind == "pos":
    return (shape[1], shape[0])
  return tuple(shape)


def _to_torch(kind, array):
  if kind == "conv2d":
    return array.transpose(3, 2, 0, 1)
  if kind == "conv1d":
    return array.T[:, :, None]
  if kind == "conv1x1":
    return array.T[:, :, None, None]
  if kind in ("linear", "pos"):
    return array.T
  return array


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def expected_shapes(config) -> dict[str, tuple]:
  """torch name → the PyTorch shape the config's network expects (no network built)."""
  return {entry.torch_name: entry.shape for entry in entries(config)}


def our_shapes(config) -> dict[tuple, tuple]:
  """Our param path → the shape `to_params` gives it (what `models.abstract` must have)."""
  return {entry.path: _from_torch_shape(entry.kind, entry.shape) for entry in entries(config)}


def _numpy(value):
  if hasattr(value, "detach"):  # a torch tensor, without importing torch
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def check_state_dict(state_dict, config) -> None:
  """Raises InputError naming the first key that is missing, unexpected or misshapen."""
  shapes = expected_shapes(config)
  for name, shape in shapes.items():
    if name not in state_dict:
      raise errors.InputError(f"state dict has no {name!r} (shape {shape}), which the config "
                              "needs: wrong model flags or not a guided-diffusion checkpoint")
    got = tuple(state_dict[name].shape)
    if got != shape:
      raise errors.InputError(f"state dict {name!r} has shape {got}, the config needs {shape}: "
                              "wrong model flags for this checkpoint")
  for name in state_dict:
    if name not in shapes:
      raise errors.InputError(f"state dict has {name!r}, which the config does not: wrong "
                              "model flags or not a guided-diffusion checkpoint")


def to_params(state_dict, config):
  """The params (nested dict of float32 jax arrays) of guided-diffusion `state_dict`."""
  check_state_dict(state_dict, config)
  params = {}
  for entry in entries(config):
    array = _from_torch(entry.kind, _numpy(state_dict[entry.torch_name]).astype(np.float32))
    _set(params, entry.path, jnp.asarray(np.ascontiguousarray(array)))
  return params


def to_state_dict(params, config) -> dict[str, np.ndarray]:
  """The inverse of `to_params`: guided-diffusion's names and layouts, float32 numpy."""
  return {entry.torch_name: np.ascontiguousarray(
              _to_torch(entry.kind, np.asarray(_get(params, entry.path), np.float32)))
          for entry in entries(config)}


def _one_line(error) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def read_torch_state_dict(path) -> dict[str, np.ndarray]:
  """A state dict from a `.safetensors` file, or a `.pt` one via `torch.load(weights_only=
  True)` (torch imported here only); arrays as numpy, floats as float32.

  A file whose unpickling needs more than tensors and plain containers is refused, as is
  anything that is not a dict of tensors.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise errors.MissingFileError(f"no checkpoint file {str(path)!r}")
  if path.suffix == ".safetensors":
    from safetensors import numpy as safetensors_numpy

    try:
      loaded = safetensors_numpy.load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a bad header
      raise errors.InputError(f"{path} is not a readable .safetensors file: "
                              f"{_one_line(e)}") from e
  else:
    import pickle

    import torch

    try:
      loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
      if "Weights only load failed" in str(e):
        raise errors.InputError(
            f"{path} holds more than weights (its unpickling needs code; refused with "
            "weights_only=True): save model.state_dict() instead") from e
      raise errors.InputError(f"{path} is not a PyTorch checkpoint: {_one_line(e)}") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
      raise errors.InputError(f"{path} is not a complete PyTorch checkpoint (truncated?): "
                              f"{_one_line(e)}") from e
  if not isinstance(loaded, dict) or not all(
      isinstance(k, str) and hasattr(v, "shape") for k, v in loaded.items()):
    raise errors.InputError(f"{path} is not a state dict (a dict of name → tensor)")
  out = {}
  for name, value in loaded.items():
    array = _numpy(value)
    out[name] = array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array
  return out
