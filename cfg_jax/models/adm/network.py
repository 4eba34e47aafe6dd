"""OpenAI's ADM networks (Dhariwal & Nichol 2021, arXiv:2105.05233) in Flax NNX.

`UNetModel` is guided-diffusion's ε-network (`guided_diffusion/unet.py`, class UNetModel) and
`EncoderUNetModel` its noisy ImageNet classifier, layer for layer, so that the released
PyTorch checkpoints load through `port.to_params`. The module tree mirrors guided-diffusion's
(`input_blocks[i][j]`, `middle_block[j]`, `output_blocks[i][j]`), which keeps the weight port
a table of renames and transposes.

Layout: NHWC images in [-1, 1], `t` int32 timesteps of the 1000-step schedule, `y` int32
labels in [0, num_classes) (no null label). With `learn_sigma` the 6 output channels are ε
then the variance values v (Nichol & Dhariwal 2021, eq. 15, with guided-diffusion's
frac = (v + 1) / 2), in the order guided-diffusion splits its output channels.

Parameters are float32. `config.dtype` (guided-diffusion's `use_fp16`, e.g. "bfloat16") is the
compute dtype of the torso (input, middle and output blocks): as in guided-diffusion the
timestep embedding and the output head stay float32, GroupNorm statistics and the attention
softmax are float32 (its GroupNorm32 and `softmax(weight.float())`).

Configs are what `presets.model_config` / `presets.classifier_config` return; `unet_layout` and
`encoder_layout` turn one into the list of layers that both the modules and the port follow.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cfg_jax.models import conv, layers

GROUPS = 32  # guided-diffusion's normalization(): GroupNorm32(32, channels), eps 1e-5
EPSILON = 1e-5
POOLS = ("attention", "adaptive", "spatial", "spatial_v2")
# PyTorch's default for Conv and Linear weights, U(±1/√fan_in) (kaiming_uniform, a = √5), as
# guided-diffusion trains from; biases start at zero.
TORCH_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


class Layer(NamedTuple):
  """One layer of a TimestepEmbedSequential block of guided-diffusion.

  kind: "conv" (input conv), "res" (ResBlock), "attn" (AttentionBlock), "down" (Downsample),
  "up" (Upsample). `resample` is "up"/"down" for a ResBlock that resamples
  (resblock_updown), and for "down"/"up" whether the layer has a convolution ("conv") or
  only pools / repeats ("").
  """
  kind: str
  channels: int
  out_channels: int
  heads: int = 0
  resample: str = ""


def _option(config, name, default):
  value = getattr(config, name, None) if not isinstance(config, dict) else config.get(name)
  return default if value is None else value


def _heads(channels, num_heads, num_head_channels):
  """AttentionBlock's head count: num_heads, or channels // num_head_channels if given."""
  if num_head_channels == -1:
    return num_heads
  if channels % num_head_channels:
    raise ValueError(f"{channels} attention channels are not divisible by num_head_channels "
                     f"{num_head_channels}")
  return channels // num_head_channels


def _encoder_half(config):
  """Input blocks and middle block of UNetModel/EncoderUNetModel, with the skip channels
  and the final downsample rate."""
  model_ch = config.model_channels
  mults = tuple(config.channel_mult)
  attention = tuple(config.attention_resolutions)
  resample = "conv" if _option(config, "conv_resample", True) else ""
  heads = lambda ch: _heads(ch, config.num_heads, config.num_head_channels)
  ch = int(mults[0] * model_ch)
  blocks = [(Layer("conv", _option(config, "in_channels", 3), ch),)]
  skips, ds = [ch], 1
  for level, mult in enumerate(mults):
    for _ in range(config.num_res_blocks):
      out = int(mult * model_ch)
      layers = [Layer("res", ch, out)]
      ch = out
      if ds in attention:
        layers.append(Layer("attn", ch, ch, heads(ch)))
      blocks.append(tuple(layers))
      skips.append(ch)
    if level != len(mults) - 1:
      blocks.append((Layer("res", ch, ch, resample="down") if config.resblock_updown
                     else Layer("down", ch, ch, resample=resample),))
      skips.append(ch)
      ds *= 2
  middle = (Layer("res", ch, ch), Layer("attn", ch, ch, heads(ch)), Layer("res", ch, ch))
  return tuple(blocks), middle, skips, ds


def unet_layout(config):
  """(input_blocks, middle_block, output_blocks) of UNetModel as tuples of `Layer`s."""
  inputs, middle, skips, ds = _encoder_half(config)
  model_ch = config.model_channels
  mults = tuple(config.channel_mult)
  attention = tuple(config.attention_resolutions)
  upsample_heads = _option(config, "num_heads_upsample", -1)
  upsample_heads = config.num_heads if upsample_heads == -1 else upsample_heads
  resample = "conv" if _option(config, "conv_resample", True) else ""
  ch = middle[-1].out_channels
  outputs = []
  for level, mult in reversed(list(enumerate(mults))):
    for i in range(config.num_res_blocks + 1):
      out = int(model_ch * mult)
      layers = [Layer("res", ch + skips.pop(), out)]
      ch = out
      if ds in attention:
        layers.append(Layer("attn", ch, ch, _heads(ch, upsample_heads, config.num_head_channels)))
      if level and i == config.num_res_blocks:
        layers.append(Layer("res", ch, ch, resample="up") if config.resblock_updown
                      else Layer("up", ch, ch, resample=resample))
        ds //= 2
      outputs.append(tuple(layers))
  return inputs, middle, tuple(outputs)


def encoder_layout(config):
  """(input_blocks, middle_block, final downsample rate) of EncoderUNetModel."""
  inputs, middle, _, ds = _encoder_half(config)
  return inputs, middle, ds


def group_norm(norm: nnx.GroupNorm, x, scale=None, shift=None):
  """GroupNorm32 of NHWC `x` in float32, then `· (1 + scale) + shift` if given; in x's dtype.

  Per-channel moments over the pixels, combined per group (E[x²] − E[x]²), folded with the
  affine and the scale-shift into per-(image, channel) a, b so the big tensor is read once
  for the statistics and once for x·a + b (as cfg_jax.models.unet.group_norm, which measured
  faster on XLA:CPU).
  """
  b, h, w, c = x.shape
  groups = norm.num_groups
  flat = x.reshape(b, h * w, c).astype(jnp.float32)
  mean = jnp.mean(jnp.mean(flat, axis=1).reshape(b, groups, c // groups), axis=-1)
  square = jnp.mean(jnp.mean(jnp.square(flat), axis=1).reshape(b, groups, c // groups), axis=-1)
  inv = jax.lax.rsqrt(jnp.maximum(square - jnp.square(mean), 0.0) + norm.epsilon)
  a = jnp.repeat(inv, c // groups, axis=-1) * norm.scale[...].astype(jnp.float32)
  offset = norm.bias[...].astype(jnp.float32) - jnp.repeat(mean, c // groups, axis=-1) * a
  if scale is not None:
    scale, shift = scale.astype(jnp.float32), shift.astype(jnp.float32)
    a, offset = a * (1 + scale), offset * (1 + scale) + shift
  out = flat.reshape(x.shape) * a[:, None, None, :] + offset[:, None, None, :]
  return out.astype(x.dtype)


def _norm(channels, rngs):
  return nnx.GroupNorm(channels, num_groups=GROUPS, epsilon=EPSILON, rngs=rngs)


def _conv3(channels, out_channels, dtype, rngs, zero=False):
  """3x3 stride-1 conv with padding 1 (= "SAME", conv.Conv's fast input gradient)."""
  return conv.Conv(channels, out_channels, (3, 3), padding="SAME", dtype=dtype, rngs=rngs,
                   kernel_init=nnx.initializers.zeros if zero else TORCH_INIT)


def _dense(channels, out_channels, dtype, rngs, zero=False):
  return nnx.Linear(channels, out_channels, dtype=dtype, rngs=rngs,
                    kernel_init=nnx.initializers.zeros if zero else TORCH_INIT)


def _upsample(x):
  """Nearest-neighbour ×2 (F.interpolate(scale_factor=2, mode="nearest"))."""
  b, h, w, c = x.shape
  return jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(
      b, 2 * h, 2 * w, c)


def _avg_pool(x):
  """2x2 average pool with stride 2 (nn.AvgPool2d(2, 2), which drops an odd last row)."""
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return jnp.mean(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


class ResBlock(nnx.Module):
  """guided-diffusion's ResBlock: norm, SiLU, (resample), conv, + embedding (added, or as
  GroupNorm scale-shift with use_scale_shift_norm), norm, SiLU, dropout, zero conv; skip."""

  def __init__(self, layer: Layer, emb_dim, config, dtype, *, rngs):
    ch, out = layer.channels, layer.out_channels
    self.use_scale_shift_norm = bool(config.use_scale_shift_norm)
    self.resample = layer.resample
    self.dropout_rate = float(_option(config, "dropout", 0.0))
    self.in_norm = _norm(ch, rngs)
    self.in_conv = _conv3(ch, out, dtype, rngs)
    # Float32 like the rest of the embedding path (guided-diffusion casts only convs to fp16).
    self.emb_proj = _dense(emb_dim, (2 if self.use_scale_shift_norm else 1) * out, None, rngs)
    self.out_norm = _norm(out, rngs)
    self.out_conv = _conv3(out, out, dtype, rngs, zero=True)
    self.skip = (None if out == ch else conv.Conv(ch, out, (1, 1), padding="SAME", dtype=dtype,
                                                  kernel_init=TORCH_INIT, rngs=rngs))

  def __call__(self, x, emb, dropout_key=None):
    h = nnx.silu(group_norm(self.in_norm, x))
    if self.resample == "up":
      h, x = _upsample(h), _upsample(x)
    elif self.resample == "down":
      h, x = _avg_pool(h), _avg_pool(x)
    h = self.in_conv(h)
    emb_out = self.emb_proj(nnx.silu(emb))[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(emb_out[:, 0, 0], 2, axis=-1)
      h = group_norm(self.out_norm, h, scale, shift)
    else:
      h = group_norm(self.out_norm, h + emb_out.astype(h.dtype))
    h = self.out_conv(layers.dropout(nnx.silu(h), self.dropout_rate, dropout_key))
    return (x if self.skip is None else self.skip(x)) + h


def _split_qkv(qkv, heads, legacy):
  """q, k, v of shape (B, T, heads, d) from the packed qkv (B, T, 3·heads·d).

  guided-diffusion packs the channels two ways: QKVAttentionLegacy splits heads first
  ((heads, 3, d): [q₁ k₁ v₁ q₂ …]), QKVAttention (use_new_attention_order) splits q, k, v
  first ((3, heads, d)).
  """
  b, t, width = qkv.shape
  d = width // (3 * heads)
  if legacy:
    q, k, v = jnp.moveaxis(qkv.reshape(b, t, heads, 3, d), 3, 0)
  else:
    q, k, v = jnp.moveaxis(qkv.reshape(b, t, 3, heads, d), 2, 0)
  return q, k, v


def _attend(q, k, v):
  """softmax(q·kᵀ / √d)·v per head, (B, T, heads, d) → (B, T, heads, d); logits and softmax
  in float32, as guided-diffusion's `softmax(weight.float())`.

  Two einsums: on XLA:CPU (64x64 preset's 32x32 attention, batch 4) 1.4x faster than
  jax.nn.dot_product_attention forward and 1.6x with the gradient.
  """
  logits = jnp.einsum("bthd,bshd->bhts", q * q.shape[-1] ** -0.5, k,
                      preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshd->bthd", weights, v)


class AttentionBlock(nnx.Module):
  """Self-attention over the pixels: x + proj_out(attention(qkv(norm(x))))."""

  def __init__(self, layer: Layer, config, dtype, *, rngs):
    ch = layer.channels
    self.heads = layer.heads
    self.legacy = not bool(_option(config, "use_new_attention_order", False))
    self.norm = _norm(ch, rngs)
    self.qkv = _dense(ch, 3 * ch, dtype, rngs)  # conv1d with kernel 1
    self.proj_out = _dense(ch, ch, dtype, rngs, zero=True)

  def __call__(self, x):
    b, h, w, c = x.shape
    qkv = self.qkv(group_norm(self.norm, x).reshape(b, h * w, c))
    q, k, v = _split_qkv(qkv, self.heads, self.legacy)
    attended = _attend(q, k, v).reshape(b, h * w, c)
    return x + self.proj_out(attended).reshape(b, h, w, c)


class Downsample(nnx.Module):
  """3x3 conv with stride 2 and PyTorch's padding 1 on each side, or a 2x2 average pool."""

  def __init__(self, layer: Layer, dtype, *, rngs):
    ch = layer.channels
    # Explicit (1, 1): XLA's "SAME" pads a stride-2 conv of an even size by (0, 1).
    self.op = (conv.Conv(ch, layer.out_channels, (3, 3), strides=(2, 2),
                         padding=((1, 1), (1, 1)), dtype=dtype, kernel_init=TORCH_INIT,
                         rngs=rngs)
               if layer.resample == "conv" else None)

  def __call__(self, x):
    return _avg_pool(x) if self.op is None else self.op(x)


class Upsample(nnx.Module):
  """Nearest ×2, then a 3x3 conv if the layer has one."""

  def __init__(self, layer: Layer, dtype, *, rngs):
    self.conv = (_conv3(layer.channels, layer.out_channels, dtype, rngs)
                 if layer.resample == "conv" else None)

  def __call__(self, x):
    x = _upsample(x)
    return x if self.conv is None else self.conv(x)


def _make(layer: Layer, emb_dim, config, dtype, rngs):
  if layer.kind == "conv":
    return _conv3(layer.channels, layer.out_channels, dtype, rngs)
  if layer.kind == "res":
    return ResBlock(layer, emb_dim, config, dtype, rngs=rngs)
  if layer.kind == "attn":
    return AttentionBlock(layer, config, dtype, rngs=rngs)
  if layer.kind == "down":
    return Downsample(layer, dtype, rngs=rngs)
  return Upsample(layer, dtype, rngs=rngs)


def _block(layers, emb_dim, config, dtype, rngs):
  return nnx.List([_make(layer, emb_dim, config, dtype, rngs) for layer in layers])


def _run(block, h, emb, dropout_key, counter):
  """TimestepEmbedSequential: ResBlocks take the embedding (and a dropout key of their own)."""
  for layer in block:
    if isinstance(layer, ResBlock):
      counter[0] += 1
      key = None if dropout_key is None else jax.random.fold_in(dropout_key, counter[0])
      h = layer(h, emb, key)
    else:
      h = layer(h)
  return h


class TimeEmbed(nnx.Module):
  """time_embed: Linear, SiLU, Linear on the sinusoidal features (float32)."""

  def __init__(self, channels, emb_dim, *, rngs):
    self.channels = channels
    self.fc1 = _dense(channels, emb_dim, None, rngs)
    self.fc2 = _dense(emb_dim, emb_dim, None, rngs)

  def __call__(self, t):
    return self.fc2(nnx.silu(self.fc1(layers.timestep_embedding(t, self.channels))))


def _compute_dtype(config):
  return jnp.dtype(_option(config, "dtype", "float32"))


class UNetModel(nnx.Module):
  """ε_θ(x_t, t, y) of guided-diffusion (UNetModel), NHWC.

  Config fields (guided-diffusion's UNetModel arguments): image_size, in_channels (3),
  model_channels, out_channels (3, or 6 with learn_sigma), num_res_blocks,
  attention_resolutions (downsample rates), dropout, channel_mult, conv_resample (True),
  class_cond, num_classes, num_heads, num_head_channels, num_heads_upsample,
  use_scale_shift_norm, resblock_updown, use_new_attention_order, dtype ("float32").
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    dtype = _compute_dtype(config)
    self.dtype = dtype.name
    emb_dim = 4 * config.model_channels
    self.class_cond = bool(config.class_cond)
    self.time_embed = TimeEmbed(config.model_channels, emb_dim, rngs=rngs)
    # N(0, 1) rows, as torch's nn.Embedding.
    self.label_emb = (nnx.Embed(config.num_classes, emb_dim,
                                embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
                      if self.class_cond else None)
    inputs, middle, outputs = unet_layout(config)
    self.input_blocks = nnx.List([_block(b, emb_dim, config, dtype, rngs) for b in inputs])
    self.middle_block = _block(middle, emb_dim, config, dtype, rngs)
    self.output_blocks = nnx.List([_block(b, emb_dim, config, dtype, rngs) for b in outputs])
    ch = outputs[-1][0].out_channels
    self.out_norm = _norm(ch, rngs)
    self.out_conv = _conv3(ch, config.out_channels, None, rngs, zero=True)

  def __call__(self, x, t, y=None, *, dropout_key=None):
    """x (B, H, W, 3) float, t (B,) int, y (B,) int labels if class_cond (else ignored):
    (B, H, W, out_channels) float32, ε then v."""
    emb = self.time_embed(t)
    if self.class_cond:
      if y is None:
        raise ValueError("a class-conditional UNetModel needs labels y")
      emb = emb + self.label_emb(y)
    counter = [0]
    h = x.astype(self.dtype)
    skips = []
    for block in self.input_blocks:
      h = _run(block, h, emb, dropout_key, counter)
      skips.append(h)
    h = _run(self.middle_block, h, emb, dropout_key, counter)
    for block in self.output_blocks:
      h = _run(block, jnp.concatenate([h, skips.pop()], axis=-1), emb, dropout_key, counter)
    h = h.astype(jnp.float32)  # the output head in float32, as guided-diffusion's `out`
    return self.out_conv(nnx.silu(group_norm(self.out_norm, h)))


class AttentionPool2d(nnx.Module):
  """CLIP's attention pooling (guided-diffusion AttentionPool2d): the mean token, prepended to
  the pixels, plus a learnt positional embedding, attends over all tokens (QKVAttention
  order); c_proj of its output. Only the mean token's query is computed, since only its
  output is kept."""

  def __init__(self, spatial, channels, head_channels, out_channels, *, rngs):
    self.heads = channels // head_channels
    # (tokens, channels); guided-diffusion stores (channels, tokens).
    self.positional_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (spatial ** 2 + 1, channels)) / channels ** 0.5)
    self.qkv_proj = _dense(channels, 3 * channels, None, rngs)
    self.c_proj = _dense(channels, out_channels, None, rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    tokens = x.reshape(b, h * w, c)
    tokens = jnp.concatenate([jnp.mean(tokens, axis=1, keepdims=True), tokens], axis=1)
    tokens = tokens + self.positional_embedding[...][None]
    q, k, v = _split_qkv(self.qkv_proj(tokens), self.heads, legacy=False)
    pooled = _attend(q[:, :1], k, v).reshape(b, c)
    return self.c_proj(pooled)


class EncoderUNetModel(nnx.Module):
  """p_φ(y | x_t, t): guided-diffusion's EncoderUNetModel (the noisy classifier), NHWC.

  Config fields: those of UNetModel's encoder half (image_size, in_channels, model_channels,
  num_res_blocks, attention_resolutions, channel_mult, num_heads, num_head_channels,
  use_scale_shift_norm, resblock_updown, use_new_attention_order, dropout, dtype), plus
  out_channels (the number of classes) and pool: "attention" (the released classifiers),
  "adaptive", "spatial" or "spatial_v2".
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    dtype = _compute_dtype(config)
    self.dtype = dtype.name
    self.pool = config.pool
    if self.pool not in POOLS:
      raise ValueError(f"unknown classifier pool {self.pool!r}; one of {POOLS}")
    emb_dim = 4 * config.model_channels
    self.time_embed = TimeEmbed(config.model_channels, emb_dim, rngs=rngs)
    inputs, middle, ds = encoder_layout(config)
    self.input_blocks = nnx.List([_block(b, emb_dim, config, dtype, rngs) for b in inputs])
    self.middle_block = _block(middle, emb_dim, config, dtype, rngs)
    ch, out = middle[-1].out_channels, config.out_channels
    if self.pool == "attention":
      if config.num_head_channels == -1:
        raise ValueError("the attention pool needs num_head_channels")
      self.out_norm = _norm(ch, rngs)
      self.attention_pool = AttentionPool2d(config.image_size // ds, ch,
                                            config.num_head_channels, out, rngs=rngs)
    elif self.pool == "adaptive":
      self.out_norm = _norm(ch, rngs)
      self.out_proj = _dense(ch, out, None, rngs, zero=True)  # a zero 1x1 conv
    else:
      features = sum(block[-1].out_channels for block in inputs) + ch
      self.hidden = _dense(features, 2048, None, rngs)
      self.hidden_norm = _norm(2048, rngs) if self.pool == "spatial_v2" else None
      self.out_proj = _dense(2048, out, None, rngs)

  def __call__(self, x, t, *, dropout_key=None):
    """x (B, H, W, 3) float, t (B,) int: logits (B, out_channels) float32."""
    emb = self.time_embed(t)
    counter = [0]
    h = x.astype(self.dtype)
    means = []
    for block in self.input_blocks:
      h = _run(block, h, emb, dropout_key, counter)
      means.append(jnp.mean(h.astype(jnp.float32), axis=(1, 2)))
    h = _run(self.middle_block, h, emb, dropout_key, counter).astype(jnp.float32)
    if self.pool == "attention":
      return self.attention_pool(nnx.silu(group_norm(self.out_norm, h)))
    if self.pool == "adaptive":
      return self.out_proj(jnp.mean(nnx.silu(group_norm(self.out_norm, h)), axis=(1, 2)))
    hidden = self.hidden(jnp.concatenate(means + [jnp.mean(h, axis=(1, 2))], axis=-1))
    if self.hidden_norm is None:
      hidden = nnx.relu(hidden)
    else:
      hidden = nnx.silu(group_norm(self.hidden_norm, hidden[:, None, None, :])[:, 0, 0])
    return self.out_proj(hidden)


def network_class(config):
  """EncoderUNetModel for a classifier config (one with `pool`), else UNetModel."""
  return EncoderUNetModel if _option(config, "pool", None) is not None else UNetModel
