"""PyTorch weights and configs into `cfg_jax.models.dit`: diffusers' `DiTTransformer2DModel`
and `AutoencoderKL`, and DiT's own checkpoints (facebookresearch/DiT `models.py`).

A port is a `Mapping` from each of our parameter paths ("blocks/3/qkv/kernel") to the source
keys it is made of (several for a fused q, k, v, concatenated along our last axis), built
from the config alone, so tests can check at full size that every key of a checkpoint is
used exactly once. PyTorch Conv2d weights are OIHW and become HWIO; Linear weights (out, in)
become (in, out). A state dict that does not fit raises `InputError` naming the first key
that differs.

The DiT conventions that differ between the two sources (see `network`) are set by the
configs: `dit_config` has DiT's (the original checkpoints), `config_from_diffusers_dit`
diffusers' (a diffusers checkpoint run as diffusers runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import pickle
from collections.abc import Mapping as AbcMapping

import jax
import ml_collections
import numpy as np

from cfg_jax import models
from cfg_jax.errors import InputError, MissingFileError
from cfg_jax.models.dit import network, vae

# (depth, hidden_size, num_heads) of the DiT family (DiT Table 1).
DIT_FAMILY = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
DIT_PATCHES = (2, 4, 8)


@dataclasses.dataclass(frozen=True)
class Mapping:
  """Which source keys make each of our parameters.

  names: our parameter path → the source keys concatenated (along our last axis) into it.
  tied: source key → the key whose value it must repeat (diffusers' copies of one embedder).
  buffers: source key → the fixed value it must hold (DiT's sin-cos `pos_embed`).
  """
  names: dict
  tied: dict = dataclasses.field(default_factory=dict)
  buffers: dict = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- configs

def dit_config(name: str = "DiT-XL/2", *, image_shape=(32, 32, 4), num_classes: int = 1000,
               learn_sigma: bool = True, dtype: str = "float32") -> ml_collections.ConfigDict:
  """A DiT family member ("DiT-S/8" … "DiT-XL/2") with the conventions of DiT's own code.

  `image_shape` is the latent's (H, W, C): (32, 32, 4) for 256² images through the SD VAE.
  """
  try:
    size, patch = name.removeprefix("DiT-").split("/")
    depth, hidden, heads = DIT_FAMILY[size]
    patch = int(patch)
    if patch not in DIT_PATCHES:
      raise ValueError
  except (ValueError, KeyError):
    raise InputError(f"unknown DiT model {name!r}; one of DiT-{{S,B,L,XL}}/{{2,4,8}}") from None
  return ml_collections.ConfigDict(dict(
      image_shape=tuple(image_shape), num_classes=num_classes, patch_size=patch,
      hidden_size=hidden, depth=depth, num_heads=heads, mlp_ratio=4.0,
      learn_sigma=learn_sigma, class_dropout_prob=0.1, freq_shift=0.0, mlp_norm_eps=1e-6,
      per_block_embedder=False, dropout=0.0, dtype=dtype))


def sd_vae_config(dtype: str = "float32") -> ml_collections.ConfigDict:
  """The Stable Diffusion VAE (stabilityai/sd-vae-ft-ema, -mse): 8× down, 4 latent channels."""
  return ml_collections.ConfigDict(dict(
      in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
      layers_per_block=2, latent_channels=4, norm_num_groups=32, mid_block_attention=True,
      use_quant_conv=True, use_post_quant_conv=True, scaling_factor=0.18215,
      shift_factor=0.0, dtype=dtype))


def _require(config_json, field, allowed, default):
  value = config_json.get(field, default)
  value = tuple(value) if isinstance(value, list) else value
  if value not in allowed:
    raise InputError(f"config.json: {field}={value!r} is not supported (only {allowed!r})")
  return value


def config_from_diffusers_dit(config_json: dict, dtype: str = "float32"
                              ) -> ml_collections.ConfigDict:
  """Our DiT config from a diffusers `DiTTransformer2DModel` (or DiT `Transformer2DModel`)
  `config.json`, with diffusers' conventions (freq_shift 1, its `norm_eps` before the MLP)."""
  _require(config_json, "_class_name", ("DiTTransformer2DModel", "Transformer2DModel"),
           "DiTTransformer2DModel")
  _require(config_json, "norm_type", ("ada_norm_zero",), "ada_norm_zero")
  _require(config_json, "activation_fn", ("gelu-approximate",), "gelu-approximate")
  _require(config_json, "attention_bias", (True,), True)
  _require(config_json, "norm_elementwise_affine", (False,), False)
  _require(config_json, "cross_attention_dim", (None,), None)
  num_classes = config_json.get("num_embeds_ada_norm", 1000)
  patch = config_json.get("patch_size", 2)
  if num_classes is None or patch is None:
    raise InputError("config.json: a DiT needs num_embeds_ada_norm and patch_size")
  heads = config_json.get("num_attention_heads", 16)
  size = config_json.get("sample_size", 32)
  in_ch = config_json.get("in_channels", 4)
  out_ch = config_json.get("out_channels") or in_ch
  if out_ch not in (in_ch, 2 * in_ch):
    raise InputError(f"config.json: out_channels={out_ch} is neither in_channels ({in_ch}) "
                     f"nor twice it (learned variance)")
  return ml_collections.ConfigDict(dict(
      image_shape=(size, size, in_ch), num_classes=num_classes, patch_size=patch,
      hidden_size=heads * config_json.get("attention_head_dim", 72), depth=config_json.get(
          "num_layers", 28), num_heads=heads, mlp_ratio=4.0, learn_sigma=out_ch == 2 * in_ch,
      # diffusers' CombinedTimestepLabelEmbeddings fixes both.
      class_dropout_prob=0.1, freq_shift=1.0, mlp_norm_eps=config_json.get("norm_eps", 1e-5),
      per_block_embedder=False, dropout=config_json.get("dropout", 0.0), dtype=dtype))


def config_from_diffusers_vae(config_json: dict, dtype: str = "float32"
                              ) -> ml_collections.ConfigDict:
  """Our VAE config from a diffusers `AutoencoderKL` `config.json` (diffusers' defaults for
  absent fields)."""
  _require(config_json, "_class_name", ("AutoencoderKL",), "AutoencoderKL")
  _require(config_json, "act_fn", ("silu",), "silu")
  channels = tuple(config_json.get("block_out_channels", (64,)))
  for field, kind in (("down_block_types", "DownEncoderBlock2D"),
                      ("up_block_types", "UpDecoderBlock2D")):
    _require(config_json, field, ((kind,) * len(channels),), (kind,) * len(channels))
  shift = config_json.get("shift_factor")
  return ml_collections.ConfigDict(dict(
      in_channels=config_json.get("in_channels", 3),
      out_channels=config_json.get("out_channels", 3), block_out_channels=channels,
      layers_per_block=config_json.get("layers_per_block", 1),
      latent_channels=config_json.get("latent_channels", 4),
      norm_num_groups=config_json.get("norm_num_groups", 32),
      mid_block_attention=bool(config_json.get("mid_block_add_attention", True)),
      use_quant_conv=bool(config_json.get("use_quant_conv", True)),
      use_post_quant_conv=bool(config_json.get("use_post_quant_conv", True)),
      scaling_factor=float(config_json.get("scaling_factor", 0.18215)),
      shift_factor=0.0 if shift is None else float(shift), dtype=dtype))


# ----------------------------------------------------------------------------- name maps

def _linear(names, ours, *theirs):
  names[f"{ours}/kernel"] = tuple(f"{t}.weight" for t in theirs)
  names[f"{ours}/bias"] = tuple(f"{t}.bias" for t in theirs)


def dit_names_diffusers(config) -> Mapping:
  """Our DiT parameters ← diffusers `DiTTransformer2DModel` keys.

  diffusers keeps an embedder in every block; with `per_block_embedder` False ours is block
  0's and the others must be equal copies (as in checkpoints converted from DiT).
  """
  names, tied = {}, {}
  _linear(names, "patch_embed", "pos_embed.proj")
  embedder = lambda j: f"transformer_blocks.{j}.norm1.emb"
  own = config.depth if config.per_block_embedder else 1
  for j in range(config.depth):
    parts = {"time_fc1": "timestep_embedder.linear_1", "time_fc2": "timestep_embedder.linear_2"}
    if j < own:
      for ours, theirs in parts.items():
        _linear(names, f"embedders/{j}/{ours}", f"{embedder(j)}.{theirs}")
      names[f"embedders/{j}/labels/embedding"] = (
          f"{embedder(j)}.class_embedder.embedding_table.weight",)
    else:
      for theirs in parts.values():
        for leaf in ("weight", "bias"):
          tied[f"{embedder(j)}.{theirs}.{leaf}"] = f"{embedder(0)}.{theirs}.{leaf}"
      table = "class_embedder.embedding_table.weight"
      tied[f"{embedder(j)}.{table}"] = f"{embedder(0)}.{table}"
  for i in range(config.depth):
    b = f"transformer_blocks.{i}"
    _linear(names, f"blocks/{i}/modulation", f"{b}.norm1.linear")
    _linear(names, f"blocks/{i}/qkv", f"{b}.attn1.to_q", f"{b}.attn1.to_k", f"{b}.attn1.to_v")
    _linear(names, f"blocks/{i}/proj", f"{b}.attn1.to_out.0")
    _linear(names, f"blocks/{i}/fc1", f"{b}.ff.net.0.proj")
    _linear(names, f"blocks/{i}/fc2", f"{b}.ff.net.2")
  _linear(names, "final/modulation", "proj_out_1")
  _linear(names, "final/linear", "proj_out_2")
  return Mapping(names, tied)


def embedders_tied(state_dict, depth: int) -> bool:
  """Whether every block of a diffusers DiT state dict holds the same (t, y) embedder as block
  0 (checkpoints converted from DiT do): then one embedder serves all."""
  prefix = "transformer_blocks.{}.norm1.emb."
  first = {k[len(prefix.format(0)):]: v for k, v in state_dict.items()
           if k.startswith(prefix.format(0))}
  return all(np.array_equal(np.asarray(state_dict.get(prefix.format(j) + name, np.nan)),
                            np.asarray(value))
             for j in range(1, depth) for name, value in first.items())


def dit_names_original(config) -> Mapping:
  """Our DiT parameters ← DiT's `models.py` keys; its `pos_embed` must be the fixed sin-cos."""
  if config.per_block_embedder:
    raise InputError("DiT's own checkpoints have one embedder: set per_block_embedder=False")
  names = {}
  _linear(names, "patch_embed", "x_embedder.proj")
  _linear(names, "embedders/0/time_fc1", "t_embedder.mlp.0")
  _linear(names, "embedders/0/time_fc2", "t_embedder.mlp.2")
  names["embedders/0/labels/embedding"] = ("y_embedder.embedding_table.weight",)
  for i in range(config.depth):
    b = f"blocks.{i}"
    _linear(names, f"blocks/{i}/modulation", f"{b}.adaLN_modulation.1")
    _linear(names, f"blocks/{i}/qkv", f"{b}.attn.qkv")
    _linear(names, f"blocks/{i}/proj", f"{b}.attn.proj")
    _linear(names, f"blocks/{i}/fc1", f"{b}.mlp.fc1")
    _linear(names, f"blocks/{i}/fc2", f"{b}.mlp.fc2")
  _linear(names, "final/modulation", "final_layer.adaLN_modulation.1")
  _linear(names, "final/linear", "final_layer.linear")
  h, w, _ = config.image_shape
  p = config.patch_size
  pos = network.sincos_pos_embed(config.hidden_size, h // p, w // p, h // p)
  return Mapping(names, buffers={"pos_embed": pos[None]})


_VAE_RENAME = {"attention": "attentions.0", "downsample": "downsamplers.0.conv",
               "upsample": "upsamplers.0.conv", "to_out": "to_out.0", "kernel": "weight",
               "scale": "weight"}


def vae_names_diffusers(config) -> Mapping:
  """Our VAE parameters ← diffusers `AutoencoderKL` keys: the same tree, renamed."""
  names = {}
  for path in _flat(models.abstract(vae.AutoencoderKL, config)[1]):
    parts = [_VAE_RENAME.get(p, p) for p in path.split("/")]
    if "qkv" in parts:
      i = parts.index("qkv")
      names[path] = tuple(".".join(parts[:i] + [f"to_{n}"] + parts[i + 1:]) for n in "qkv")
    else:
      names[path] = (".".join(parts),)
  return Mapping(names)


# ----------------------------------------------------------------------------- porting

def _flat(tree) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def _source_shape(shape, n):
  """The PyTorch shape of one of the n sources concatenated into our parameter `shape`."""
  last = shape[-1]
  if last % n:
    raise ValueError(f"cannot split {shape} into {n}")
  if len(shape) == 4:  # HWIO ← OIHW
    return (last // n, shape[2], shape[0], shape[1])
  if len(shape) == 2:  # (in, out) ← (out, in)
    return (last // n, shape[0])
  return (last // n,)


def source_shapes(mapping: Mapping, abstract_params) -> dict:
  """The state dict a port expects: every source key → its PyTorch shape."""
  ours = _flat(abstract_params)
  if set(ours) != set(mapping.names):
    raise RuntimeError(f"name map out of step with the model: "
                       f"{sorted(set(ours) ^ set(mapping.names))[:3]}")
  shapes = {}
  for path, keys in mapping.names.items():
    shape = tuple(ours[path].shape)
    if path.endswith("/embedding"):  # (rows, dim) in both
      shapes[keys[0]] = shape
      continue
    for key in keys:
      shapes[key] = _source_shape(shape, len(keys))
  for key, ref in mapping.tied.items():
    shapes[key] = shapes[ref]
  for key, value in mapping.buffers.items():
    shapes[key] = tuple(value.shape)
  return shapes


def _to_numpy(value):
  if hasattr(value, "detach"):  # a torch tensor; bfloat16 has no numpy dtype
    value = value.detach().cpu()
    value = (value.float() if value.is_floating_point() else value).numpy()
  value = np.asarray(value)
  return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value


def _to_ours(value, path):
  if path.endswith("/kernel") and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW → HWIO
  if path.endswith("/kernel"):
    return value.T  # (out, in) → (in, out)
  return value  # biases, norm scales, embedding tables


def port(state_dict, mapping: Mapping, abstract_params, what: str):
  """Our params (nested dict of float32 numpy arrays) from `state_dict` through `mapping`;
  `InputError` naming the first key that is missing, unexpected, mis-shaped or mis-valued."""
  expected = source_shapes(mapping, abstract_params)
  for key, shape in expected.items():
    if key not in state_dict:
      raise InputError(f"{what} state dict has no {key!r}; is it a checkpoint of this "
                       f"model and config?")
    got = tuple(state_dict[key].shape)
    if got != shape:
      raise InputError(f"{what} state dict: {key!r} has shape {got}, expected {shape} for "
                       f"this config")
  for key in state_dict:
    if key not in expected:
      raise InputError(f"{what} state dict has unexpected key {key!r}; is it a checkpoint "
                       f"of this model and config?")
  arrays = {key: _to_numpy(state_dict[key]) for key in expected}
  for key, ref in mapping.tied.items():
    if not np.array_equal(arrays[key], arrays[ref]):
      raise InputError(f"{what} state dict: {key!r} differs from {ref!r}; for a model with "
                       f"an embedder per block set per_block_embedder=True")
  for key, value in mapping.buffers.items():
    if not np.allclose(arrays[key], value, rtol=0, atol=1e-5):
      raise InputError(f"{what} state dict: {key!r} is not the fixed 2-D sin-cos embedding")

  def convert(path, leaf):
    path = "/".join(str(k.key) for k in path)
    parts = [_to_ours(arrays[key], path) for key in mapping.names[path]]
    out = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)
    assert out.shape == tuple(leaf.shape), (path, out.shape, leaf.shape)
    return out

  return jax.tree_util.tree_map_with_path(convert, abstract_params)


def dit_params_from_diffusers(state_dict, config):
  """Our DiT params from a diffusers `DiTTransformer2DModel` state dict."""
  abstract = models.abstract(network.DiT, config)[1]
  return port(state_dict, dit_names_diffusers(config), abstract, "DiT (diffusers)")


def dit_params_from_original(state_dict, config):
  """Our DiT params from a DiT `models.py` state dict (e.g. DiT-XL-2-256x256.pt)."""
  abstract = models.abstract(network.DiT, config)[1]
  return port(state_dict, dit_names_original(config), abstract, "DiT (original)")


def vae_params_from_diffusers(state_dict, config):
  """Our VAE params from a diffusers `AutoencoderKL` state dict."""
  abstract = models.abstract(vae.AutoencoderKL, config)[1]
  return port(state_dict, vae_names_diffusers(config), abstract, "AutoencoderKL (diffusers)")


# ----------------------------------------------------------------------------- files

_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def _first_line(error) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  hint = [line for line in lines if "Unsupported global" in line]
  return (hint or lines or [type(error).__name__])[0]


def _load_torch(path):
  try:
    import torch
  except ImportError:
    raise InputError(f"{path}: reading a PyTorch checkpoint needs torch (pip install torch); "
                     f"or convert it to .safetensors") from None
  try:
    # DiT's train.py saves its argparse.Namespace beside the weights: plain data, allowed.
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as error:
    if "Weights only load failed" in str(error):
      raise InputError(f"{path}: holds more than weights (pickled objects), refused: "
                       f"{_first_line(error)}") from None
    raise InputError(f"{path}: not a readable PyTorch checkpoint (truncated?): "
                     f"{_first_line(error)}") from None
  except (RuntimeError, EOFError, OSError, ValueError) as error:
    raise InputError(f"{path}: not a readable PyTorch checkpoint (truncated?): "
                     f"{_first_line(error)}") from None


def read_state_dict(path) -> dict:
  """{key: numpy array} from a `.safetensors` file or a PyTorch `.bin`/`.pt`/`.pth`/`.ckpt`.

  Floating arrays come as float32. A training checkpoint {"model", "ema", ...} (DiT's
  train.py) gives its "ema" weights, else its "model" (or "state_dict"). PyTorch files load
  with `weights_only=True`: one that needs code to unpickle is refused.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise MissingFileError(f"{path}: no such file")
  if path.suffix == ".safetensors":
    import safetensors.numpy
    try:
      tensors = safetensors.numpy.load_file(str(path))
    except Exception as error:  # safetensors raises its own SafetensorError, or OSError
      raise InputError(f"{path}: not a readable safetensors file: {_first_line(error)}"
                       ) from None
  elif path.suffix in _TORCH_SUFFIXES:
    tensors = _load_torch(path)
    if isinstance(tensors, AbcMapping):
      for wrapper in ("ema", "model", "state_dict"):
        if isinstance(tensors.get(wrapper), AbcMapping):
          tensors = tensors[wrapper]
          break
  else:
    raise InputError(f"{path}: unknown checkpoint format; expected .safetensors or one of "
                     f"{', '.join(_TORCH_SUFFIXES)}")
  if not isinstance(tensors, AbcMapping) or not all(
      hasattr(v, "shape") for v in tensors.values()):
    raise InputError(f"{path}: not a state dict (a mapping of names to tensors)")
  return {str(k): _to_numpy(v) for k, v in tensors.items()}
