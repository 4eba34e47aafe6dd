"""DiT and the SD VAE against diffusers (and DiT's own models.py), on perturbed random weights.

DiT zero-initialises its modulations and final layer, so a fresh model outputs zeros and any
comparison would pass: every torch weight is redrawn (seeded) before porting.
"""

import argparse
import functools
import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from cfg_jax import models  # noqa: E402
from cfg_jax.errors import InputError  # noqa: E402
from cfg_jax.models.dit import network, port, vae  # noqa: E402

NUM_CLASSES = 10
SMALL_DIT = dict(num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=8,
                 num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=NUM_CLASSES)
SMALL_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=2,
                 norm_num_groups=8, latent_channels=4, sample_size=16)
T = np.array([0, 1, 250, 999], np.int32)
Y = np.array([0, 3, NUM_CLASSES - 1, NUM_CLASSES], np.int32)  # the last is the null label


def perturb(module, seed=0):
  """Redraws every weight: N(0, 1/fan_in) for matrices and kernels, norm scales 1 + N(0, 0.1²),
  biases N(0, 0.1²), so activations stay O(1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if p.ndim >= 2:
        p.copy_(noise / math.sqrt(math.prod(p.shape[1:])))
      elif "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.1 * noise)
      else:
        p.copy_(0.1 * noise)
  return module.eval()  # eval: diffusers' LabelEmbedding drops labels in training mode


def tie_embedders(model):
  """Block 0's embedder copied into every block, as in checkpoints converted from DiT."""
  with torch.no_grad():
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
  return model


def run(model_cls, config, params, *inputs, method=None):
  graphdef, _ = models.abstract(model_cls, config)
  if method is None:
    fn = functools.partial(models.apply, graphdef)
  else:
    fn = lambda p, *xs: method(graphdef, p, *xs)  # noqa: E731
  return np.asarray(jax.jit(fn)(params, *inputs))


@pytest.fixture(scope="module")
def torch_dit():
  torch.manual_seed(0)
  return perturb(diffusers.DiTTransformer2DModel(**SMALL_DIT))


@pytest.fixture(scope="module")
def latents():
  return np.random.default_rng(0).normal(size=(4, 8, 8, 4)).astype(np.float32)


def diffusers_eps(model, x):
  with torch.no_grad():
    out = model(torch.from_numpy(x).permute(0, 3, 1, 2), timestep=torch.from_numpy(T).long(),
                class_labels=torch.from_numpy(Y).long()).sample
  return out.permute(0, 2, 3, 1).numpy()


def test_dit_matches_diffusers_with_embedder_per_block(torch_dit, latents):
  config = port.config_from_diffusers_dit(dict(torch_dit.config))
  config.per_block_embedder = True
  params = port.dit_params_from_diffusers(torch_dit.state_dict(), config)
  ours = run(network.DiT, config, params, latents, T, Y)
  ref = diffusers_eps(torch_dit, latents)
  assert ours.shape == (4, 8, 8, 8)
  assert np.abs(ref).mean() > 0.1  # the perturbation took: not the zero-initialised model
  np.testing.assert_allclose(ours[..., :4], ref[..., :4], atol=5e-5, rtol=1e-5)  # ε
  np.testing.assert_allclose(ours[..., 4:], ref[..., 4:], atol=5e-5, rtol=1e-5)  # variance


def test_dit_matches_diffusers_with_shared_embedder(torch_dit, latents):
  model = tie_embedders(perturb(diffusers.DiTTransformer2DModel(**SMALL_DIT), seed=1))
  config = port.config_from_diffusers_dit(dict(model.config))
  assert not config.per_block_embedder
  params = port.dit_params_from_diffusers(model.state_dict(), config)
  np.testing.assert_allclose(run(network.DiT, config, params, latents, T, Y),
                             diffusers_eps(model, latents), atol=5e-5, rtol=1e-5)
  # Untied copies cannot run on one embedder: refused, naming block 1's first copy.
  with pytest.raises(InputError, match=r"transformer_blocks\.1\.norm1\.emb\..*per_block"):
    port.dit_params_from_diffusers(torch_dit.state_dict(), config)


# DiT's models.py (facebookresearch/DiT), condensed; timm's Attention and Mlp written out.
def _original_1d(dim, pos):
  omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
  out = np.einsum("m,d->md", pos.reshape(-1), 1.0 / 10000 ** omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def original_pos_embed(dim, grid):
  g = np.stack(np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32)))
  g = g.reshape(2, 1, grid, grid)
  return np.concatenate([_original_1d(dim // 2, g[0]), _original_1d(dim // 2, g[1])], axis=1)


class OriginalDiT(nn.Module):

  def __init__(self, input_size, patch, in_ch, hidden, depth, heads, num_classes):
    super().__init__()
    self.p, self.heads, self.out_ch = patch, heads, 2 * in_ch
    self.x_embedder = nn.Module()
    self.x_embedder.proj = nn.Conv2d(in_ch, hidden, patch, stride=patch)
    self.t_embedder = nn.Module()
    self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(),
                                        nn.Linear(hidden, hidden))
    self.y_embedder = nn.Module()
    self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden)
    n = (input_size // patch) ** 2
    self.pos_embed = nn.Parameter(torch.zeros(1, n, hidden), requires_grad=False)
    self.blocks = nn.ModuleList()
    for _ in range(depth):
      block = nn.Module()
      block.attn = nn.Module()
      block.attn.qkv, block.attn.proj = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
      block.mlp = nn.Module()
      block.mlp.fc1, block.mlp.fc2 = nn.Linear(hidden, 4 * hidden), nn.Linear(4 * hidden, hidden)
      block.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
      self.blocks.append(block)
    self.final_layer = nn.Module()
    self.final_layer.linear = nn.Linear(hidden, patch * patch * self.out_ch)
    self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

  @staticmethod
  def timestep_embedding(t, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

  def forward(self, x, t, y):
    norm = lambda h: F.layer_norm(h, h.shape[-1:], eps=1e-6)  # noqa: E731
    modulate = lambda h, shift, scale: h * (1 + scale[:, None]) + shift[:, None]  # noqa: E731
    x = self.x_embedder.proj(x).flatten(2).transpose(1, 2) + self.pos_embed
    c = self.t_embedder.mlp(self.timestep_embedding(t, 256)) + self.y_embedder.embedding_table(y)
    for blk in self.blocks:
      sm, cm, gm, sf, cf, gf = blk.adaLN_modulation(c).chunk(6, dim=1)
      b, n, d = x.shape
      qkv = blk.attn.qkv(modulate(norm(x), sm, cm)).reshape(b, n, 3, self.heads, d // self.heads)
      q, k, v = qkv.permute(2, 0, 3, 1, 4)
      a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
      x = x + gm[:, None] * blk.attn.proj(a)
      h = blk.mlp.fc2(F.gelu(blk.mlp.fc1(modulate(norm(x), sf, cf)), approximate="tanh"))
      x = x + gf[:, None] * h
    shift, scale = self.final_layer.adaLN_modulation(c).chunk(2, dim=1)
    x = self.final_layer.linear(modulate(norm(x), shift, scale))
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, self.p, self.p, self.out_ch)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], self.out_ch, h * self.p,
                                                       w * self.p)


def original_state_dict(diffusers_sd, config):
  """DiT's own key layout, made from a diffusers state dict by inverting both name maps."""
  to_diffusers = port.dit_names_diffusers(config).names
  out = {}
  mapping = port.dit_names_original(config)
  for path, (key,) in mapping.names.items():
    out[key] = torch.cat([diffusers_sd[k] for k in to_diffusers[path]], dim=0)
  out.update({k: torch.from_numpy(v) for k, v in mapping.buffers.items()})
  return out


def test_original_layout_matches_dit_models_py(latents):
  model = tie_embedders(perturb(diffusers.DiTTransformer2DModel(**SMALL_DIT), seed=2))
  config = port.dit_config("DiT-S/2", image_shape=(8, 8, 4), num_classes=NUM_CLASSES)
  config.update(depth=2, hidden_size=64, num_heads=4)
  state = original_state_dict(model.state_dict(), config)
  original = OriginalDiT(8, 2, 4, 64, 2, 4, NUM_CLASSES).eval()
  original.load_state_dict(state, strict=True)  # exactly DiT's keys and shapes
  np.testing.assert_allclose(state["pos_embed"][0].numpy(), original_pos_embed(64, 4), atol=1e-7)
  params = port.dit_params_from_original(state, config)
  with torch.no_grad():
    ref = original(torch.from_numpy(latents).permute(0, 3, 1, 2), torch.from_numpy(T).long(),
                   torch.from_numpy(Y).long()).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(run(network.DiT, config, params, latents, T, Y), ref,
                             atol=2e-4, rtol=1e-4)
  bad = dict(state, pos_embed=torch.zeros_like(state["pos_embed"]))
  with pytest.raises(InputError, match="'pos_embed' is not the fixed"):
    port.dit_params_from_original(bad, config)


def test_timestep_features_follow_each_source():
  t = torch.tensor([0, 7, 999])
  from diffusers.models.embeddings import get_timestep_embedding
  ref = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1).numpy()
  ours = np.asarray(network.timestep_features(t.numpy(), 256, freq_shift=1.0))
  np.testing.assert_allclose(ours, ref, atol=1e-4)  # see timestep_features
  ours = np.asarray(network.timestep_features(t.numpy(), 256, freq_shift=0.0))
  np.testing.assert_allclose(ours, OriginalDiT.timestep_embedding(t, 256).numpy(), atol=1e-4)


def test_pos_embed_is_diffusers_sincos_at_and_off_the_trained_grid():
  from diffusers.models.embeddings import get_2d_sincos_pos_embed
  for grid in (4, 6):  # trained on 4×4 tokens; 6×6 is interpolated to the same range
    ref = get_2d_sincos_pos_embed(64, grid, base_size=4, interpolation_scale=1.0).numpy()
    np.testing.assert_allclose(network.sincos_pos_embed(64, grid, grid, 4), ref, atol=1e-6)
  np.testing.assert_array_equal(network.sincos_pos_embed(64, 4, 4, 4),
                                original_pos_embed(64, 4).astype(np.float32))


def test_bad_dit_state_dicts_name_the_key(torch_dit):
  config = port.config_from_diffusers_dit(dict(torch_dit.config))
  config.per_block_embedder = True
  state = dict(torch_dit.state_dict())
  key = "transformer_blocks.1.attn1.to_k.weight"
  with pytest.raises(InputError, match=f"has no '{key}'"):
    port.dit_params_from_diffusers({k: v for k, v in state.items() if k != key}, config)
  with pytest.raises(InputError, match=rf"'{key}' has shape \(64, 65\)"):
    port.dit_params_from_diffusers(dict(state, **{key: torch.zeros(64, 65)}), config)
  with pytest.raises(InputError, match="unexpected key 'extra.weight'"):
    port.dit_params_from_diffusers(dict(state, **{"extra.weight": torch.zeros(1)}), config)


def test_dit_bfloat16_compute_is_close(torch_dit, latents):
  config = port.config_from_diffusers_dit(dict(torch_dit.config), dtype="bfloat16")
  config.per_block_embedder = True
  params = port.dit_params_from_diffusers(torch_dit.state_dict(), config)
  out = run(network.DiT, config, params, latents, T, Y)
  assert out.dtype == jax.numpy.bfloat16
  ref = diffusers_eps(torch_dit, latents)
  assert np.abs(out.astype(np.float32) - ref).max() < 0.1 * np.abs(ref).max()


def test_vae_matches_diffusers():
  model = perturb(diffusers.AutoencoderKL(**SMALL_VAE))
  config = port.config_from_diffusers_vae(dict(model.config))
  params = port.vae_params_from_diffusers(model.state_dict(), config)
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  z = rng.normal(size=(2, 8, 8, 4)).astype(np.float32)
  with torch.no_grad():
    posterior = model.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    image = model.decode(torch.from_numpy(z).permute(0, 3, 1, 2)).sample
  nhwc = lambda a: a.permute(0, 2, 3, 1).numpy()  # noqa: E731
  mean, logvar = (np.asarray(a) for a in jax.jit(functools.partial(
      vae.encode, models.abstract(vae.AutoencoderKL, config)[0]))(params, x))
  assert np.abs(nhwc(posterior.mean)).mean() > 0.1
  np.testing.assert_allclose(mean, nhwc(posterior.mean), atol=5e-5, rtol=1e-5)
  np.testing.assert_allclose(logvar, nhwc(posterior.logvar), atol=5e-5, rtol=1e-5)
  decoded = run(vae.AutoencoderKL, config, params, z, method=vae.decode)
  assert decoded.shape == (2, 16, 16, 3)
  np.testing.assert_allclose(decoded, nhwc(image), atol=5e-5, rtol=1e-5)
  key = "decoder.up_blocks.0.upsamplers.0.conv.weight"
  state = {k: v for k, v in model.state_dict().items() if k != key}
  with pytest.raises(InputError, match=key):
    port.vae_params_from_diffusers(state, config)


def _meta_shapes(model_cls, **kwargs):
  with torch.device("meta"):
    model = model_cls(**kwargs)
  return model, {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_full_size_dit_xl2_maps_one_to_one():
  model, shapes = _meta_shapes(diffusers.DiTTransformer2DModel, num_attention_heads=16,
                               attention_head_dim=72, in_channels=4, out_channels=8,
                               num_layers=28, sample_size=32, patch_size=2,
                               num_embeds_ada_norm=1000)
  config = port.config_from_diffusers_dit(dict(model.config))
  preset = port.dit_config("DiT-XL/2")
  for field in ("image_shape", "num_classes", "patch_size", "hidden_size", "depth",
                "num_heads", "learn_sigma", "class_dropout_prob"):
    assert config[field] == preset[field], field
  shared = models.abstract(network.DiT, config)[1]
  # DiT's 675 M counts its frozen pos_embed (256 × 1152) as a parameter; ours computes it.
  assert models.count_params(shared) == 675_129_632 - 256 * 1152
  # Every diffusers key, the 27 copies of the embedder included, and its shape.
  assert port.source_shapes(port.dit_names_diffusers(config), shared) == shapes
  # DiT's layout (the preset's conventions change no shape): 8 + 10 per block + 4 keys.
  original = port.source_shapes(port.dit_names_original(preset), shared)
  assert len(original) == 8 + 10 * 28 + 4 and original["pos_embed"] == (1, 256, 1152)
  config.per_block_embedder = True
  per_block = models.abstract(network.DiT, config)[1]
  assert port.source_shapes(port.dit_names_diffusers(config), per_block) == shapes
  assert models.count_params(per_block) == sum(math.prod(s) for s in shapes.values())
  assert original["blocks.27.attn.qkv.weight"] == (3 * 1152, 1152)


def test_full_size_sd_vae_maps_one_to_one():
  model, shapes = _meta_shapes(diffusers.AutoencoderKL, block_out_channels=(128, 256, 512, 512),
                               down_block_types=("DownEncoderBlock2D",) * 4,
                               up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2,
                               latent_channels=4, norm_num_groups=32, sample_size=256)
  config = port.config_from_diffusers_vae(dict(model.config))
  assert config == port.sd_vae_config()
  abstract = models.abstract(vae.AutoencoderKL, config)[1]
  assert port.source_shapes(port.vae_names_diffusers(config), abstract) == shapes
  assert models.count_params(abstract) == sum(math.prod(s) for s in shapes.values())


def test_presets():
  for size, (depth, hidden, heads) in port.DIT_FAMILY.items():
    for patch in (2, 4, 8):
      config = port.dit_config(f"DiT-{size}/{patch}")
      assert (config.depth, config.hidden_size, config.num_heads, config.patch_size) == (
          depth, hidden, heads, patch)
  with pytest.raises(InputError, match="DiT-XL/3"):
    port.dit_config("DiT-XL/3")
  with pytest.raises(InputError, match="norm_type"):
    port.config_from_diffusers_dit({"norm_type": "ada_norm"})


def test_read_state_dict(tmp_path):
  import safetensors.numpy

  weights = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
  safetensors.numpy.save_file(weights, tmp_path / "w.safetensors")
  np.testing.assert_array_equal(port.read_state_dict(tmp_path / "w.safetensors")["a.weight"],
                                weights["a.weight"])
  ema = {"a.weight": torch.ones(2, 3, dtype=torch.bfloat16)}
  # DiT's train.py checkpoint: the EMA weights are taken.
  torch.save({"model": {"a.weight": torch.zeros(2, 3)}, "ema": ema, "opt": {},
              "args": argparse.Namespace(model="DiT-XL/2")}, tmp_path / "train.pt")
  got = port.read_state_dict(tmp_path / "train.pt")
  assert got["a.weight"].dtype == np.float32 and got["a.weight"].sum() == 6
  torch.save({"a.weight": torch.zeros(1), "code": Pickled()}, tmp_path / "code.pt")
  with pytest.raises(InputError, match="more than weights") as info:
    port.read_state_dict(tmp_path / "code.pt")
  assert "\n" not in str(info.value)
  data = (tmp_path / "train.pt").read_bytes()
  (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
  with pytest.raises(InputError, match="not a readable PyTorch checkpoint") as info:
    port.read_state_dict(tmp_path / "cut.pt")
  assert "\n" not in str(info.value)
  (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00")
  with pytest.raises(InputError, match="not a readable safetensors"):
    port.read_state_dict(tmp_path / "cut.safetensors")


class Pickled:
  """An object torch.load(weights_only=True) must refuse."""
