"""The KL autoencoder of latent diffusion (Rombach et al. 2022, §3 and appendix G) in Flax
NNX, laid out as diffusers' `AutoencoderKL` so its weights (stabilityai/sd-vae-ft-ema,
-mse) port one to one.

`encode(x)` maps an NHWC image in [-1, 1] to the mean and log-variance of the diagonal
Gaussian posterior (logvar clipped to [−30, 20] as diffusers' DiagonalGaussianDistribution);
`decode(z)` maps a latent back to the image. Neither applies `scaling_factor` (0.18215 for
SD): the latent a diffusion model sees is scaling_factor · z, and decode takes z.

Encoder: conv, per level `layers_per_block` residual blocks and a stride-2 conv (zero pad on
the bottom and right only, diffusers' `Downsample2D(padding=0)`), a middle of residual,
single-head self-attention, residual, then GroupNorm, SiLU, conv to 2·latent_channels.
Decoder: the mirror, `layers_per_block + 1` blocks per level and nearest ×2 upsampling
followed by a conv. All GroupNorms have ε = 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cfg_jax.models import conv

EPS = 1e-6


def _norm(channels, config, dtype, rngs):
  # Two-pass variance, as torch: decoder activations are large enough for E[x²] − E[x]² to
  # lose digits in float32.
  return nnx.GroupNorm(channels, num_groups=config.norm_num_groups, epsilon=EPS,
                       use_fast_variance=False, dtype=dtype, rngs=rngs)


def _conv3(in_ch, out_ch, dtype, rngs):
  return conv.Conv(in_ch, out_ch, (3, 3), dtype=dtype, rngs=rngs)


def _conv1(in_ch, out_ch, dtype, rngs):
  return conv.Conv(in_ch, out_ch, (1, 1), dtype=dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
  """x + conv(SiLU(GN(conv(SiLU(GN(x)))))), a 1×1 conv on the skip when channels change."""

  def __init__(self, in_ch, out_ch, config, dtype, *, rngs):
    self.norm1 = _norm(in_ch, config, dtype, rngs)
    self.conv1 = _conv3(in_ch, out_ch, dtype, rngs)
    self.norm2 = _norm(out_ch, config, dtype, rngs)
    self.conv2 = _conv3(out_ch, out_ch, dtype, rngs)
    self.conv_shortcut = _conv1(in_ch, out_ch, dtype, rngs) if in_ch != out_ch else None

  def __call__(self, x):
    h = self.conv1(nnx.silu(self.norm1(x)))
    h = self.conv2(nnx.silu(self.norm2(h)))
    return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttentionBlock(nnx.Module):
  """x + out(softmax(q kᵀ / √C) v) over the pixels of GN(x), one head of all C channels."""

  def __init__(self, channels, config, dtype, *, rngs):
    self.group_norm = _norm(channels, config, dtype, rngs)
    self.qkv = nnx.Linear(channels, 3 * channels, dtype=dtype, rngs=rngs)
    self.to_out = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    b, h, w, c = x.shape
    qkv = self.qkv(self.group_norm(x).reshape(b, h * w, 1, c))
    q, k, v = jnp.split(qkv, 3, axis=-1)
    return x + self.to_out(jax.nn.dot_product_attention(q, k, v)).reshape(b, h, w, c)


class MidBlock(nnx.Module):

  def __init__(self, channels, config, dtype, *, rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, config, dtype, rngs=rngs)
                             for _ in range(2)])
    self.attention = (AttentionBlock(channels, config, dtype, rngs=rngs)
                      if config.mid_block_attention else None)

  def __call__(self, x):
    x = self.resnets[0](x)
    if self.attention is not None:
      x = self.attention(x)
    return self.resnets[1](x)


class Level(nnx.Module):
  """Residual blocks at one resolution, then the resampling conv (None at the last level)."""

  def __init__(self, in_ch, out_ch, num_blocks, resample, config, dtype, *, rngs):
    self.resnets = nnx.List([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, config, dtype,
                                         rngs=rngs) for i in range(num_blocks)])
    self.downsample = (nnx.Conv(out_ch, out_ch, (3, 3), strides=(2, 2),
                                padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)
                       if resample == "down" else None)
    self.upsample = _conv3(out_ch, out_ch, dtype, rngs) if resample == "up" else None


def _upsample_nearest(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Encoder(nnx.Module):

  def __init__(self, config, dtype, *, rngs):
    channels = tuple(config.block_out_channels)
    self.conv_in = _conv3(config.in_channels, channels[0], dtype, rngs)
    self.down_blocks = nnx.List()
    in_ch = channels[0]
    for i, out_ch in enumerate(channels):
      last = i == len(channels) - 1
      self.down_blocks.append(Level(in_ch, out_ch, config.layers_per_block,
                                    None if last else "down", config, dtype, rngs=rngs))
      in_ch = out_ch
    self.mid_block = MidBlock(in_ch, config, dtype, rngs=rngs)
    self.conv_norm_out = _norm(in_ch, config, dtype, rngs)
    self.conv_out = _conv3(in_ch, 2 * config.latent_channels, dtype, rngs)

  def __call__(self, x):
    h = self.conv_in(x)
    for level in self.down_blocks:
      for block in level.resnets:
        h = block(h)
      if level.downsample is not None:
        h = level.downsample(h)
    h = self.mid_block(h)
    return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):

  def __init__(self, config, dtype, *, rngs):
    channels = tuple(reversed(tuple(config.block_out_channels)))
    self.conv_in = _conv3(config.latent_channels, channels[0], dtype, rngs)
    self.mid_block = MidBlock(channels[0], config, dtype, rngs=rngs)
    self.up_blocks = nnx.List()
    in_ch = channels[0]
    for i, out_ch in enumerate(channels):
      last = i == len(channels) - 1
      self.up_blocks.append(Level(in_ch, out_ch, config.layers_per_block + 1,
                                  None if last else "up", config, dtype, rngs=rngs))
      in_ch = out_ch
    self.conv_norm_out = _norm(in_ch, config, dtype, rngs)
    self.conv_out = _conv3(in_ch, config.out_channels, dtype, rngs)

  def __call__(self, z):
    h = self.mid_block(self.conv_in(z))
    for level in self.up_blocks:
      for block in level.resnets:
        h = block(h)
      if level.upsample is not None:
        h = level.upsample(_upsample_nearest(h))
    return self.conv_out(nnx.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
  """The KL-regularised autoencoder; `__call__` reconstructs x through the posterior mean.

  Config fields: in_channels, out_channels, block_out_channels, layers_per_block,
  latent_channels, norm_num_groups, mid_block_attention, use_quant_conv,
  use_post_quant_conv, scaling_factor, shift_factor, dtype.
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.get("dtype", "float32"))
    latent = config.latent_channels
    self.scaling_factor = float(config.scaling_factor)
    self.shift_factor = float(config.shift_factor)
    self.encoder = Encoder(config, dtype, rngs=rngs)
    self.decoder = Decoder(config, dtype, rngs=rngs)
    self.quant_conv = (_conv1(2 * latent, 2 * latent, dtype, rngs)
                       if config.use_quant_conv else None)
    self.post_quant_conv = (_conv1(latent, latent, dtype, rngs)
                            if config.use_post_quant_conv else None)

  def encode(self, x):
    """(mean, logvar) of q(z | x), each (B, H/f, W/f, latent_channels), before scaling."""
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    """The image (B, f·h, f·w, out_channels), nominally in [-1, 1], of an unscaled latent."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x):
    return self.decode(self.encode(x)[0])


def encode(graphdef, params, x):
  """`AutoencoderKL.encode` as a pure function of (graphdef, params)."""
  return nnx.merge(graphdef, params).encode(x)


def decode(graphdef, params, z):
  """`AutoencoderKL.decode` as a pure function of (graphdef, params)."""
  return nnx.merge(graphdef, params).decode(z)


def to_diffusion_latent(z, scaling_factor: float, shift_factor: float = 0.0):
  """The latent a latent-diffusion model is trained on: (z − shift) · scaling_factor."""
  return (z - shift_factor) * scaling_factor


def from_diffusion_latent(latent, scaling_factor: float, shift_factor: float = 0.0):
  """The inverse of `to_diffusion_latent`: what `decode` takes."""
  return latent / scaling_factor + shift_factor
