"""DiT, the Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with
Transformers"), in Flax NNX.

The latent (B, H, W, C) is cut into p×p patches (a convolution with kernel = stride = p),
each a token with a fixed 2-D sin-cos position; transformer blocks with adaLN-Zero
conditioning (§3.2: the block's LayerNorm scale and shift and a per-channel gate of each
residual branch regress from the embedding c = t_emb(t) + y_emb(y), the gates starting at
zero) run over the tokens; a final adaLN layer and a linear map give p·p·out_channels values
per token, rearranged back to (B, H, W, out_channels). With `learn_sigma` the output holds ε
in the first C channels and the values interpolating the variance (Nichol & Dhariwal 2021,
eq. 15) in the last C.

Conventions where DiT's own code and diffusers' port of it differ are config fields
(`cfg_jax.models.dit.port` sets them for each source):
- `freq_shift`: the timestep features use frequencies 10000^(−i/(half − freq_shift)); DiT's
  `TimestepEmbedder` has 0, diffusers' `CombinedTimestepLabelEmbeddings` 1.
- `mlp_norm_eps`: the LayerNorm before the MLP; DiT 1e-6, diffusers `norm_eps` (1e-5).
- `per_block_embedder`: diffusers gives every block its own copy of the (t, y) embedder
  (converted checkpoints hold 28 identical copies) and the final layer uses block 0's; DiT
  has one. With False (DiT's architecture) one embedder serves all.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cfg_jax.models import layers

TIMESTEP_FEATURES = 256  # DiT's frequency_embedding_size, fixed in diffusers too


def timestep_features(t, dim: int = TIMESTEP_FEATURES, freq_shift: float = 0.0,
                      max_period: float = 10_000.0):
  """Sinusoidal features of the timesteps, cos then sin (DiT's `TimestepEmbedder`).

  Frequencies exp(−log(max_period)·i / (dim/2 − freq_shift)), i < dim/2, as diffusers'
  `get_timestep_embedding(flip_sin_to_cos=True)`. At t ≈ 1000 one ulp of a frequency moves
  the features by ~1e-4, so the exponent is formed in float32 as torch forms it and the
  exponential is rounded correctly from float64, which agrees with torch's float32 exp on
  all but a few of the 128 frequencies (XLA's on ~50 fewer).
  """
  half = dim // 2
  exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32)
  exponent = exponent / np.float32(half - freq_shift)
  freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  omega = 1.0 / 10_000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


@functools.lru_cache(maxsize=16)
def sincos_pos_embed(dim: int, grid_h: int, grid_w: int, base_size: int) -> np.ndarray:
  """(grid_h·grid_w, dim) fixed positions of the row-major tokens (MAE's 2-D sin-cos).

  The first dim/2 channels encode the column, the last dim/2 the row, as DiT's and
  diffusers' `get_2d_sincos_pos_embed` (float64, then float32). Positions are in units of
  the training grid `base_size`: diffusers' interpolation for a grid of another size, and
  plain integer positions at the trained size.
  """
  if dim % 4:
    raise ValueError(f"hidden_size must be a multiple of 4 for 2-D sin-cos, got {dim}")
  rows = np.arange(grid_h, dtype=np.float32) / np.float32(grid_h / base_size)
  cols = np.arange(grid_w, dtype=np.float32) / np.float32(grid_w / base_size)
  col_grid, row_grid = np.meshgrid(cols, rows)  # (grid_h, grid_w) each
  emb = np.concatenate([_sincos_1d(dim // 2, col_grid), _sincos_1d(dim // 2, row_grid)], axis=1)
  return emb.astype(np.float32)


def layer_norm(x, eps: float):
  """LayerNorm without affine parameters over the last axis, statistics in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale):
  """adaLN: x·(1 + scale) + shift, one (shift, scale) per image broadcast over tokens."""
  return x * (1 + scale[:, None]) + shift[:, None]


class ConditionEmbedder(nnx.Module):
  """c = MLP(timestep features) + label embedding (DiT's TimestepEmbedder + LabelEmbedder).

  The table has num_classes + 1 rows when labels are dropped in training: the last row is the
  null label ∅ of classifier-free guidance.
  """

  def __init__(self, config, dtype, *, rngs):
    dim = config.hidden_size
    self.freq_shift = float(config.freq_shift)
    self.time_fc1 = nnx.Linear(TIMESTEP_FEATURES, dim, dtype=dtype, rngs=rngs)
    self.time_fc2 = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
    rows = config.num_classes + (1 if config.class_dropout_prob > 0 else 0)
    # DiT initialises the table with std 0.02 (`initialize_weights`).
    self.labels = nnx.Embed(rows, dim, dtype=dtype,
                            embedding_init=nnx.initializers.normal(0.02), rngs=rngs)

  def __call__(self, t, y):
    features = timestep_features(t, TIMESTEP_FEATURES, self.freq_shift)
    features = features.astype(self.time_fc1.kernel[...].dtype)
    return self.time_fc2(nnx.silu(self.time_fc1(features))) + self.labels(y)


class DiTBlock(nnx.Module):
  """Self-attention and MLP, each a residual branch with adaLN-Zero (DiT §3.2, Fig. 3)."""

  def __init__(self, config, dtype, *, rngs):
    dim = config.hidden_size
    zeros = nnx.initializers.zeros
    self.num_heads = config.num_heads
    self.mlp_norm_eps = float(config.mlp_norm_eps)
    self.dropout_rate = float(config.dropout)
    # Zero-initialised: every gate starts at 0, so every block starts as the identity.
    self.modulation = nnx.Linear(dim, 6 * dim, kernel_init=zeros, dtype=dtype, rngs=rngs)
    xavier = nnx.initializers.xavier_uniform()
    self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=xavier, dtype=dtype, rngs=rngs)
    self.proj = nnx.Linear(dim, dim, kernel_init=xavier, dtype=dtype, rngs=rngs)
    hidden = int(dim * config.mlp_ratio)
    self.fc1 = nnx.Linear(dim, hidden, kernel_init=xavier, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, kernel_init=xavier, dtype=dtype, rngs=rngs)

  def __call__(self, x, c, dropout_key=None):
    b, n, dim = x.shape
    (shift_msa, scale_msa, gate_msa,
     shift_mlp, scale_mlp, gate_mlp) = jnp.split(self.modulation(nnx.silu(c)), 6, axis=-1)
    h = modulate(layer_norm(x, 1e-6), shift_msa, scale_msa)
    q, k, v = (a.reshape(b, n, self.num_heads, dim // self.num_heads)
               for a in jnp.split(self.qkv(h), 3, axis=-1))
    attended = jax.nn.dot_product_attention(q, k, v).reshape(b, n, dim)
    attended = layers.dropout(self.proj(attended), self.dropout_rate,
                              layers.fold(dropout_key, 0))
    x = x + gate_msa[:, None] * attended
    h = modulate(layer_norm(x, self.mlp_norm_eps), shift_mlp, scale_mlp)
    h = layers.dropout(nnx.gelu(self.fc1(h), approximate=True), self.dropout_rate,
                       layers.fold(dropout_key, 1))
    return x + gate_mlp[:, None] * self.fc2(h)


class FinalLayer(nnx.Module):
  """adaLN (shift, scale) and a linear map to p·p·out_channels values per token."""

  def __init__(self, config, out_channels, dtype, *, rngs):
    dim, p = config.hidden_size, config.patch_size
    zeros = nnx.initializers.zeros
    self.modulation = nnx.Linear(dim, 2 * dim, kernel_init=zeros, dtype=dtype, rngs=rngs)
    self.linear = nnx.Linear(dim, p * p * out_channels, kernel_init=zeros, dtype=dtype,
                             rngs=rngs)

  def __call__(self, x, c):
    shift, scale = jnp.split(self.modulation(nnx.silu(c)), 2, axis=-1)
    return self.linear(modulate(layer_norm(x, 1e-6), shift, scale))


class DiT(nnx.Module):
  """ε_θ(x_t, t, y) (and the variance values with learn_sigma) on NHWC latents.

  Config fields: image_shape (H, W, C) of the latent, num_classes, patch_size, hidden_size,
  depth, num_heads, mlp_ratio, learn_sigma, class_dropout_prob (> 0 adds the null row),
  freq_shift, mlp_norm_eps, per_block_embedder, dropout, dtype ("float32" or "bfloat16":
  the compute dtype; parameters stay float32).
  """

  def __init__(self, config, *, rngs: nnx.Rngs):
    dtype = jnp.dtype(config.get("dtype", "float32"))
    height, width, channels = config.image_shape
    p, dim = config.patch_size, config.hidden_size
    if height % p or width % p:
      raise ValueError(f"latent size {height}×{width} is not a multiple of patch {p}")
    self.patch_size = p
    self.base_size = height // p  # diffusers' PatchEmbed base_size: the trained grid
    self.out_channels = 2 * channels if config.learn_sigma else channels
    # Patch embedding initialised like a Linear layer (xavier on the flattened kernel).
    self.patch_embed = nnx.Conv(channels, dim, (p, p), strides=(p, p), padding="VALID",
                                kernel_init=nnx.initializers.xavier_uniform(in_axis=(0, 1, 2)),
                                dtype=dtype, rngs=rngs)
    count = config.depth if config.per_block_embedder else 1
    self.embedders = nnx.List([ConditionEmbedder(config, dtype, rngs=rngs) for _ in range(count)])
    self.blocks = nnx.List([DiTBlock(config, dtype, rngs=rngs) for _ in range(config.depth)])
    self.final = FinalLayer(config, self.out_channels, dtype, rngs=rngs)

  def __call__(self, x, t, y, *, dropout_key=None):
    b, height, width, _ = x.shape
    p = self.patch_size
    h = self.patch_embed(x)  # (B, H/p, W/p, D)
    gh, gw, dim = h.shape[1:]
    pos = sincos_pos_embed(dim, gh, gw, self.base_size)
    h = h.reshape(b, gh * gw, dim) + jnp.asarray(pos, h.dtype)
    conds = [embedder(t, y) for embedder in self.embedders]
    for i, block in enumerate(self.blocks):
      h = block(h, conds[i % len(conds)], layers.fold(dropout_key, i))
    h = self.final(h, conds[0])  # (B, N, p·p·out)
    # Unpatchify: token (i, j) holds its p×p pixels row-major, channels last.
    h = h.reshape(b, gh, gw, p, p, self.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return h.reshape(b, height, width, self.out_channels)
