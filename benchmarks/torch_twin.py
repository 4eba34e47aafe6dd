"""A layer-for-layer PyTorch twin of cfg_jax's UNet, its training step and its CFG sampler.

Used by `benchmarks/vs_pytorch.py` as the peer to beat. The twin mirrors
`cfg_jax/models/unet.py` module by module (same parameter count, checked), so
`load_jax_params` can copy a JAX parameter tree into it and the two forwards agree to float
tolerance; that check keeps the comparison honest when either side changes.

Only the benchmark imports this file; torch is an optional extra (`pip install -e .[bench]`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GN_EPS = 1e-6  # flax.nnx.GroupNorm's epsilon (torch's default is 1e-5)


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = t.float()[:, None] * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(channels, num_groups):
  return nn.GroupNorm(math.gcd(num_groups, channels), channels, eps=GN_EPS)


def _zero(module):
  # ADM's zero_module: each residual branch starts as the identity.
  nn.init.zeros_(module.weight)
  return module


class ResBlock(nn.Module):

  def __init__(self, in_ch, out_ch, emb_dim, dropout, num_groups):
    super().__init__()
    self.norm1 = _norm(in_ch, num_groups)
    self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
    self.emb = nn.Linear(emb_dim, 2 * out_ch)
    self.norm2 = _norm(out_ch, num_groups)
    self.dropout = nn.Dropout(dropout)
    self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
    self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

  def forward(self, x, emb):
    h = self.conv1(F.silu(self.norm1(x)))
    scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
    h = self.norm2(h) * (1 + scale) + shift
    h = self.conv2(self.dropout(F.silu(h)))
    return (x if self.skip is None else self.skip(x)) + h


class SelfAttention(nn.Module):

  def __init__(self, channels, num_heads, num_groups):
    super().__init__()
    self.norm = _norm(channels, num_groups)
    self.qkv = nn.Linear(channels, 3 * channels)
    self.out = _zero(nn.Linear(channels, channels))
    self.num_heads = num_heads

  def forward(self, x):
    b, c, h, w = x.shape
    tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
    q, k, v = (a.reshape(b, h * w, self.num_heads, -1).transpose(1, 2)
               for a in self.qkv(tokens).chunk(3, dim=-1))
    attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
    return x + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, stride=2)

  def forward(self, x):
    # XLA's "SAME" padding for stride 2 on an even size pads (0, 1), not (1, 1).
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):

  def __init__(self, channels):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):

  def __init__(self, channels_in, out_ch, emb_dim, attention, cfg):
    super().__init__()
    self.blocks = nn.ModuleList(
        [ResBlock(c, out_ch, emb_dim, cfg["dropout"], cfg["num_groups"]) for c in channels_in])
    self.attns = nn.ModuleList(
        [SelfAttention(out_ch, cfg["num_heads"], cfg["num_groups"]) for _ in channels_in]
    ) if attention else None


class TimeEmbedding(nn.Module):

  def __init__(self, channels, emb_dim):
    super().__init__()
    self.channels = channels
    self.fc1 = nn.Linear(channels, emb_dim)
    self.fc2 = nn.Linear(emb_dim, emb_dim)

  def forward(self, t):
    return self.fc2(F.silu(self.fc1(timestep_embedding(t, self.channels))))


class UNet(nn.Module):
  """ε_θ(x_t, t, y), NCHW; y == num_classes is the null label."""

  def __init__(self, cfg):
    super().__init__()
    ch = cfg["base_channels"]
    emb_dim = 4 * ch
    height, _, in_channels = cfg["image_shape"]
    self.time_embed = TimeEmbedding(ch, emb_dim)
    self.class_embed = nn.Embedding(cfg["num_classes"] + 1, emb_dim)
    self.input_conv = nn.Conv2d(in_channels, ch, 3, padding=1)
    resolution, skip_channels, in_ch = height, [ch], ch
    self.levels, self.downs = nn.ModuleList(), nn.ModuleList()
    mults = cfg["channel_mult"]
    for i, mult in enumerate(mults):
      out_ch = ch * mult
      ins = [in_ch] + [out_ch] * (cfg["num_res_blocks"] - 1)
      self.levels.append(Level(ins, out_ch, emb_dim, resolution in cfg["attention_resolutions"],
                               cfg))
      skip_channels += [out_ch] * cfg["num_res_blocks"]
      in_ch = out_ch
      last = i == len(mults) - 1
      self.downs.append(nn.Identity() if last else Downsample(out_ch))
      if not last:
        skip_channels.append(out_ch)
        resolution //= 2
    self.mid1 = ResBlock(in_ch, in_ch, emb_dim, cfg["dropout"], cfg["num_groups"])
    self.mid_attn = SelfAttention(in_ch, cfg["num_heads"], cfg["num_groups"])
    self.mid2 = ResBlock(in_ch, in_ch, emb_dim, cfg["dropout"], cfg["num_groups"])
    self.up_levels, self.ups = nn.ModuleList(), nn.ModuleList()
    for i, mult in reversed(list(enumerate(mults))):
      out_ch = ch * mult
      ins = []
      for _ in range(cfg["num_res_blocks"] + 1):
        ins.append(in_ch + skip_channels.pop())
        in_ch = out_ch
      self.up_levels.append(Level(ins, out_ch, emb_dim,
                                  resolution in cfg["attention_resolutions"], cfg))
      self.ups.append(Upsample(out_ch) if i > 0 else nn.Identity())
      resolution *= 2
    self.out_norm = _norm(in_ch, cfg["num_groups"])
    self.out_conv = _zero(nn.Conv2d(in_ch, in_channels, 3, padding=1))

  def forward(self, x, t, y):
    emb = self.time_embed(t) + self.class_embed(y)
    h = self.input_conv(x)
    skips = [h]
    for level, down in zip(self.levels, self.downs):
      for j, block in enumerate(level.blocks):
        h = block(h, emb)
        if level.attns is not None:
          h = level.attns[j](h)
        skips.append(h)
      if not isinstance(down, nn.Identity):
        h = down(h)
        skips.append(h)
    h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
    for level, up in zip(self.up_levels, self.ups):
      for j, block in enumerate(level.blocks):
        h = block(torch.cat([h, skips.pop()], dim=1), emb)
        if level.attns is not None:
          h = level.attns[j](h)
      h = up(h)
    return self.out_conv(F.silu(self.out_norm(h)))


def count_params(model) -> int:
  return sum(p.numel() for p in model.parameters())


def load_jax_params(model: UNet, params: dict) -> None:
  """Copies a cfg_jax UNet parameter dict (nnx.to_pure_dict) into the twin."""
  flat = {}

  def walk(tree, prefix):
    for key, value in tree.items():
      name = f"{prefix}.{key}" if prefix else str(key)
      if isinstance(value, dict):
        walk(value, name)
      else:
        flat[name] = np.asarray(value)

  walk(params, "")
  # The JAX encoder is a submodule; the twin keeps its layers at the top level.
  flat = {k.removeprefix("encoder."): v for k, v in flat.items()}
  with torch.no_grad():
    for name, module in model.named_modules():
      if isinstance(module, nn.Conv2d):
        module.weight.copy_(torch.from_numpy(flat.pop(f"{name}.kernel").transpose(3, 2, 0, 1)))
        module.bias.copy_(torch.from_numpy(flat.pop(f"{name}.bias")))
      elif isinstance(module, nn.Linear):
        module.weight.copy_(torch.from_numpy(flat.pop(f"{name}.kernel").T))
        module.bias.copy_(torch.from_numpy(flat.pop(f"{name}.bias")))
      elif isinstance(module, nn.GroupNorm):
        module.weight.copy_(torch.from_numpy(flat.pop(f"{name}.scale")))
        module.bias.copy_(torch.from_numpy(flat.pop(f"{name}.bias")))
      elif isinstance(module, nn.Embedding):
        module.weight.copy_(torch.from_numpy(flat.pop(f"{name}.embedding")))
  if flat:
    raise ValueError(f"JAX parameters without a twin: {sorted(flat)}")


def cosine_alphas_cumprod(num_timesteps=1000, offset=0.008, max_beta=0.999) -> torch.Tensor:
  def alpha_bar(u):
    return math.cos((u + offset) / (1 + offset) * math.pi / 2) ** 2

  betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
           for i in range(num_timesteps)]
  return torch.from_numpy(np.cumprod(1.0 - np.array(betas))).float()


class Trainer:
  """The twin of cfg_jax's train step: CFG ε-MSE with label dropout, AdamW after global-norm
  clipping with a linear warm-up, and an EMA with the min(decay, (1+n)/(10+n)) warm-up."""

  def __init__(self, model, alphas_cumprod, *, num_classes, p_uncond, learning_rate,
               warmup_steps, weight_decay, grad_clip_norm, b1, b2, ema_decay):
    self.model = model
    self.abar = alphas_cumprod
    self.num_classes, self.p_uncond = num_classes, p_uncond
    self.grad_clip_norm, self.ema_decay = grad_clip_norm, ema_decay
    self.params = [p for p in model.parameters()]
    # foreach: the multi-tensor AdamW, PyTorch's fastest eager optimizer on CPU.
    self.opt = torch.optim.AdamW(self.params, lr=learning_rate, betas=(b1, b2),
                                 weight_decay=weight_decay, foreach=True)
    warmup = max(int(warmup_steps), 1)
    # optax.linear_schedule(0, lr, warmup) evaluated at the update count.
    self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda n: min(n / warmup, 1.0))
    self.ema = [p.detach().clone() for p in self.params]
    self.step_count = 0

  def step(self, x0, labels):
    b = x0.shape[0]
    t = torch.randint(0, self.abar.shape[0], (b,))
    noise = torch.randn_like(x0)
    drop = torch.rand(b) < self.p_uncond
    y = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
    abar = self.abar[t].view(b, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    self.model.train()
    loss = F.mse_loss(self.model(x_t, t, y), noise)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip_norm, foreach=True)
    self.opt.step()
    self.sched.step()
    n = self.step_count
    rate = min(self.ema_decay, (1.0 + n) / (10.0 + n))
    with torch.no_grad():
      torch._foreach_lerp_(self.ema, self.params, 1.0 - rate)
    self.step_count += 1
    return loss.detach()


@torch.inference_mode()
def ddim_cfg_sample(model, alphas_cumprod, labels, *, num_steps=50, guidance_scale=3.0,
                    null_label, image_shape=(1, 8, 8), generator=None):
  """CFG DDIM (η = 0) with one batched cond + uncond pass per step, as diffusers does;
  x0 clipped to [-1, 1] and ε re-derived from it, "leading" timesteps as cfg_jax."""
  model.eval()
  b = labels.shape[0]
  T = alphas_cumprod.shape[0]
  stride = T // num_steps
  x = torch.randn((b, *image_shape), generator=generator)
  both_labels = torch.cat([labels, torch.full_like(labels, null_label)])
  for i in range(num_steps - 1, -1, -1):
    t = i * stride
    abar = alphas_cumprod[t]
    abar_prev = alphas_cumprod[t - stride] if t - stride >= 0 else torch.tensor(1.0)
    both = model(torch.cat([x, x]), torch.full((2 * b,), t, dtype=torch.long), both_labels)
    eps_cond, eps_uncond = both.chunk(2)
    eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    x0 = ((x - (1 - abar).sqrt() * eps) / abar.sqrt()).clamp(-1, 1)
    eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
    x = abar_prev.sqrt() * x0 + (1 - abar_prev).sqrt() * eps
  return x
