"""ADM-style UNet (Dhariwal & Nichol 2021) and its encoder half as a noisy classifier, in Flax NNX.

Residual blocks with GroupNorm and scale-shift conditioning on the (time + class)
embedding, sinusoidal timestep features, self-attention at chosen resolutions, dropout.
The class embedding has num_classes + 1 rows: the last one is the null label ∅. With
`guidance_embedding` the UNet also takes the guidance scale w (a guidance-distilled
student, Meng et al. 2023), embedded as the timestep is and added to the same embedding.
Dropout takes an explicit key (`dropout_key`); without one the model is deterministic.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from cfg_jax.models import conv, layers


def _norm(channels, num_groups, rngs):
  return nnx.GroupNorm(channels, num_groups=math.gcd(num_groups, channels), rngs=rngs)


def group_norm(norm: nnx.GroupNorm, x, scale=None, shift=None):
  """`norm(x)`, then `· (1 + scale) + shift` if given, as one multiply-add per element.

  The same parameters and statistics as nnx.GroupNorm (E[x²] − E[x]², ε inside the root),
  computed differently because it measured faster on XLA:CPU (benchmarks/PERF_FINDINGS.md):
  per-channel means over the pixels (a reduction over one contiguous axis), then the tiny
  per-group combine; the normalisation, affine and scale-shift fold into per-(image,
  channel) coefficients a, b, so the big tensor is read once for the statistics and once
  for x·a + b.
  """
  b, h, w, c = x.shape
  groups = norm.num_groups
  flat = x.reshape(b, h * w, c).astype(jnp.float32)  # statistics in float32, even from bf16
  channel_mean = jnp.mean(flat, axis=1)
  channel_sq = jnp.mean(jnp.square(flat), axis=1)
  mean = jnp.mean(channel_mean.reshape(b, groups, c // groups), axis=-1)
  var = jnp.mean(channel_sq.reshape(b, groups, c // groups), axis=-1) - jnp.square(mean)
  inv = jax.lax.rsqrt(jnp.maximum(var, 0.0) + norm.epsilon)
  a = jnp.repeat(inv, c // groups, axis=-1) * norm.scale[...]
  offset = norm.bias[...] - jnp.repeat(mean, c // groups, axis=-1) * a
  if scale is not None:
    a, offset = a * (1 + scale), offset * (1 + scale) + shift
  a, offset = a.astype(x.dtype), offset.astype(x.dtype)
  return x * a[:, None, None, :] + offset[:, None, None, :]


class ResBlock(nnx.Module):

  def __init__(self, in_ch, out_ch, emb_dim, dropout_rate, num_groups, *, rngs):
    self.norm1 = _norm(in_ch, num_groups, rngs)
    self.conv1 = conv.Conv(in_ch, out_ch, (3, 3), rngs=rngs)
    self.emb = nnx.Linear(emb_dim, 2 * out_ch, rngs=rngs)
    self.norm2 = _norm(out_ch, num_groups, rngs)
    # Zero-initialised output: each block starts as the identity (ADM's zero_module).
    self.conv2 = conv.Conv(out_ch, out_ch, (3, 3), kernel_init=nnx.initializers.zeros, rngs=rngs)
    self.skip = conv.Conv(in_ch, out_ch, (1, 1), rngs=rngs) if in_ch != out_ch else None
    self.dropout_rate = dropout_rate

  def __call__(self, x, emb, dropout_key=None):
    h = self.conv1(nnx.silu(group_norm(self.norm1, x)))
    scale, shift = jnp.split(self.emb(nnx.silu(emb)), 2, axis=-1)
    h = group_norm(self.norm2, h, scale, shift)
    h = self.conv2(layers.dropout(nnx.silu(h), self.dropout_rate, dropout_key))
    return (x if self.skip is None else self.skip(x)) + h


class SelfAttention(nnx.Module):

  def __init__(self, channels, num_heads, num_groups, *, rngs):
    self.norm = _norm(channels, num_groups, rngs)
    self.qkv = nnx.Linear(channels, 3 * channels, rngs=rngs)
    self.out = nnx.Linear(channels, channels, kernel_init=nnx.initializers.zeros, rngs=rngs)
    self.num_heads = num_heads

  def __call__(self, x):
    b, h, w, c = x.shape
    qkv = self.qkv(group_norm(self.norm, x).reshape(b, h * w, c))
    q, k, v = (a.reshape(b, h * w, self.num_heads, c // self.num_heads)
               for a in jnp.split(qkv, 3, axis=-1))
    attended = jax.nn.dot_product_attention(q, k, v).reshape(b, h * w, c)
    return x + self.out(attended).reshape(b, h, w, c)


class Downsample(nnx.Module):

  def __init__(self, channels, *, rngs):
    self.conv = conv.Conv(channels, channels, (3, 3), strides=(2, 2), rngs=rngs)

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):

  def __init__(self, channels, *, rngs):
    self.conv = conv.Conv(channels, channels, (3, 3), rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    return self.conv(jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest"))


class Level(nnx.Module):
  """Residual blocks (each optionally followed by attention) at one resolution."""

  def __init__(self, channels_in: Sequence[int], out_ch, emb_dim, attention, config, *, rngs):
    self.blocks = nnx.List([
        ResBlock(c, out_ch, emb_dim, config.dropout, config.num_groups, rngs=rngs)
        for c in channels_in
    ])
    self.attns = nnx.List([
        SelfAttention(out_ch, config.num_heads, config.num_groups, rngs=rngs)
        for _ in channels_in
    ]) if attention else None


class _Encoder(nnx.Module):
  """Input conv, down levels and the middle block, shared by the UNet and the classifier."""

  def __init__(self, config, emb_dim, *, rngs):
    ch = config.base_channels
    self.input_conv = conv.Conv(config.image_shape[-1], ch, (3, 3), rngs=rngs)
    resolution = config.image_shape[0]
    skip_channels = [ch]
    self.levels, self.downs = nnx.List(), nnx.List()
    in_ch = ch
    for i, mult in enumerate(config.channel_mult):
      out_ch = ch * mult
      ins = [in_ch] + [out_ch] * (config.num_res_blocks - 1)
      self.levels.append(Level(ins, out_ch, emb_dim, resolution in config.attention_resolutions,
                               config, rngs=rngs))
      skip_channels += [out_ch] * config.num_res_blocks
      in_ch = out_ch
      last = i == len(config.channel_mult) - 1
      self.downs.append(None if last else Downsample(out_ch, rngs=rngs))
      if not last:
        skip_channels.append(out_ch)
        resolution //= 2
    self.out_channels = in_ch
    self.skip_channels = tuple(skip_channels)  # a tuple keeps the GraphDef hashable
    self.mid1 = ResBlock(in_ch, in_ch, emb_dim, config.dropout, config.num_groups, rngs=rngs)
    self.mid_attn = SelfAttention(in_ch, config.num_heads, config.num_groups, rngs=rngs)
    self.mid2 = ResBlock(in_ch, in_ch, emb_dim, config.dropout, config.num_groups, rngs=rngs)

  def __call__(self, x, emb, dropout_key):
    h = self.input_conv(x)
    skips = [h]
    n = 0
    for level, down in zip(self.levels, self.downs):
      for j, block in enumerate(level.blocks):
        h = block(h, emb, layers.fold(dropout_key, n := n + 1))
        if level.attns is not None:
          h = level.attns[j](h)
        skips.append(h)
      if down is not None:
        h = down(h)
        skips.append(h)
    h = self.mid1(h, emb, layers.fold(dropout_key, n := n + 1))
    h = self.mid_attn(h)
    h = self.mid2(h, emb, layers.fold(dropout_key, n := n + 1))
    return h, skips


class _TimeEmbedding(nnx.Module):

  def __init__(self, channels, emb_dim, *, rngs):
    self.channels = channels
    self.fc1 = nnx.Linear(channels, emb_dim, rngs=rngs)
    self.fc2 = nnx.Linear(emb_dim, emb_dim, rngs=rngs)

  def __call__(self, t):
    # In the weights' dtype: float32 features would promote a bfloat16 model to float32.
    features = layers.timestep_embedding(t, self.channels).astype(self.fc1.kernel[...].dtype)
    return self.fc2(nnx.silu(self.fc1(features)))


# w·100 before the sinusoids: their periods, 2π/100 to 2π·100 in w, then span the guidance
# range (γ in [1, 5], say) as the timestep's 2π to 2π·10⁴ span t in 0..999.
GUIDANCE_FEATURE_SCALE = 100.0


class _GuidanceEmbedding(nnx.Module):
  """Meng et al. 2023's embedding of the guidance scale w: the timestep's sinusoidal
  features (of w·GUIDANCE_FEATURE_SCALE) through an MLP, whose zero-initialised output
  makes a fresh student its teacher's conditional model ε(x_t, t, y) at every w."""

  def __init__(self, channels, emb_dim, *, rngs):
    self.channels = channels
    self.fc1 = nnx.Linear(channels, emb_dim, rngs=rngs)
    self.fc2 = nnx.Linear(emb_dim, emb_dim, kernel_init=nnx.initializers.zeros, rngs=rngs)

  def __call__(self, w):
    features = layers.timestep_embedding(w * GUIDANCE_FEATURE_SCALE, self.channels)
    return self.fc2(nnx.silu(self.fc1(features.astype(self.fc1.kernel[...].dtype))))


class UNet(nnx.Module):
  """ε_θ(x_t, t, y); y == num_classes is the null label (unconditional).

  With `config.guidance_embedding`, ε_s(x_t, t, y, w): w (B,) float, the guidance scale
  γ (0: unconditional, 1: conditional) whose guided ε̂ the student learned.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    ch = config.base_channels
    emb_dim = 4 * ch
    self.num_classes = config.num_classes
    self.time_embed = _TimeEmbedding(ch, emb_dim, rngs=rngs)
    self.class_embed = nnx.Embed(config.num_classes + 1, emb_dim, rngs=rngs)
    self.encoder = _Encoder(config, emb_dim, rngs=rngs)
    skip_channels = list(self.encoder.skip_channels)
    in_ch = self.encoder.out_channels
    resolution = config.image_shape[0] // 2 ** (len(config.channel_mult) - 1)
    self.up_levels, self.ups = nnx.List(), nnx.List()
    for i, mult in reversed(list(enumerate(config.channel_mult))):
      out_ch = ch * mult
      ins = []  # each block sees the previous output concatenated with one skip
      for _ in range(config.num_res_blocks + 1):
        ins.append(in_ch + skip_channels.pop())
        in_ch = out_ch
      self.up_levels.append(Level(ins, out_ch, emb_dim,
                                  resolution in config.attention_resolutions, config, rngs=rngs))
      self.ups.append(Upsample(out_ch, rngs=rngs) if i > 0 else None)
      resolution *= 2
    self.out_norm = _norm(in_ch, config.num_groups, rngs)
    self.out_conv = conv.Conv(in_ch, config.image_shape[-1], (3, 3),
                             kernel_init=nnx.initializers.zeros, rngs=rngs)
    # Made last, so every other layer draws the initial values it draws without it.
    self.guidance_embed = (_GuidanceEmbedding(ch, emb_dim, rngs=rngs)
                           if config.get("guidance_embedding", False) else None)

  def __call__(self, x, t, y, w=None, *, dropout_key=None):
    if (w is None) != (self.guidance_embed is None):
      raise TypeError("A UNet with guidance_embedding takes the guidance scale w (ε(x_t, t, "
                      "y, w)); one without takes none (ε(x_t, t, y)).")
    emb = self.time_embed(t) + self.class_embed(y)
    if w is not None:
      emb = emb + self.guidance_embed(w)
    h, skips = self.encoder(x, emb, dropout_key)
    n = 100  # dropout keys of the decoder, apart from the encoder's
    for level, up in zip(self.up_levels, self.ups):
      for j, block in enumerate(level.blocks):
        h = block(jnp.concatenate([h, skips.pop()], axis=-1), emb,
                  layers.fold(dropout_key, n := n + 1))
        if level.attns is not None:
          h = level.attns[j](h)
      if up is not None:
        h = up(h)
    return self.out_conv(nnx.silu(group_norm(self.out_norm, h)))


class NoisyClassifier(nnx.Module):
  """p_φ(y | x_t, t): the UNet's encoder with the timestep embedding, pooled to logits
  (guided-diffusion's EncoderUNetModel with adaptive average pooling)."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    emb_dim = 4 * config.base_channels
    self.time_embed = _TimeEmbedding(config.base_channels, emb_dim, rngs=rngs)
    self.encoder = _Encoder(config, emb_dim, rngs=rngs)
    self.out_norm = _norm(self.encoder.out_channels, config.num_groups, rngs)
    self.head = nnx.Linear(self.encoder.out_channels, config.num_classes, rngs=rngs)

  def __call__(self, x, t, *, dropout_key=None):
    h, _ = self.encoder(x, self.time_embed(t), dropout_key)
    return self.head(jnp.mean(nnx.silu(group_norm(self.out_norm, h)), axis=(1, 2)))
