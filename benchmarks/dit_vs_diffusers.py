"""Classifier-free-guided DDIM with DiT, cfg-jax against diffusers' `DiTPipeline` loop,
interleaved in one process.

  python benchmarks/dit_vs_diffusers.py                     # DiT-S/2 on 256² latents
  python benchmarks/dit_vs_diffusers.py --model DiT-XL/2    # the released size
  python benchmarks/dit_vs_diffusers.py --quick             # checks that it runs

Both sides sample the same random-weight DiT (every weight perturbed: DiT zero-initialises
its adaLN gates and output layer) on 32×32×4 latents, with guidance scale 4 on every
channel, learned σ dropped: diffusers as `DiTPipeline.__call__` runs its transformer and
`DDIMScheduler` (the batch doubled for the two passes), cfg-jax as `sample.py` samples a
converted workdir (`sharded_sampling.sample_sharded`: one compiled `lax.scan`, both passes in
one batched call, the batch split over every device). The VAE decode is left out of both
(`--vae` adds the SD VAE, decoding once per run). Prints images/s of each, best of --rounds,
and the ratio. Needs torch and diffusers (`pip install -e '.[reference]'`).
"""

import argparse
import math
import time

import numpy as np

from cfg_jax.app import startup, xla_flags

import machine

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
              down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=256)


def _perturb(module, torch, seed):
  """Every weight random with O(1) activations (as tests/test_dit.py's `perturb`)."""
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
  return module.eval()


def _tie_embedders(model, torch):
  with torch.no_grad():
    for block in model.transformer_blocks[1:]:
      block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
  return model


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="DiT-S/2", help="DiT-{S,B,L,XL}/{2,4,8}")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10, help="DDIM steps per run")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--vae", action="store_true", help="decode with the SD VAE too")
  parser.add_argument("--quick", action="store_true", help="DiT-S/8, 5 steps, one round")
  args = parser.parse_args()
  if args.quick:
    args.model, args.steps, args.rounds, args.batch = "DiT-S/8", 5, 1, 2
  xla_flags.configure()
  startup.tune_allocator()

  import diffusers
  import jax
  import ml_collections
  import torch
  from jax.tree_util import Partial

  from cfg_jax import distributed, models, pipeline, schedules, sharded_sampling
  from cfg_jax.models.dit import network, port, vae

  print(machine.describe())
  depth, hidden, heads = port.DIT_FAMILY[args.model.removeprefix("DiT-").split("/")[0]]
  patch = int(args.model.split("/")[1])
  torch.manual_seed(0)
  transformer = _tie_embedders(_perturb(diffusers.DiTTransformer2DModel(
      num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=4,
      out_channels=8, num_layers=depth, sample_size=32, patch_size=patch,
      num_embeds_ada_norm=1000), torch, 1), torch)
  torch_vae = _perturb(diffusers.AutoencoderKL(**SD_VAE), torch, 2) if args.vae else None
  scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)
  scale = 4.0
  labels = np.arange(args.batch) * 97 % 1000

  def run_torch():  # DiTPipeline.__call__'s loop
    scheduler.set_timesteps(args.steps)
    y = torch.cat([torch.from_numpy(labels), torch.full((args.batch,), 1000)])
    x = torch.randn(args.batch, 4, 32, 32)
    with torch.no_grad():
      for t in scheduler.timesteps:
        out = transformer(torch.cat([x, x]), timestep=t.expand(2 * args.batch),
                          class_labels=y).sample
        cond, uncond = out[:, :4].chunk(2)
        x = scheduler.step(uncond + scale * (cond - uncond), t, x).prev_sample
      if torch_vae is not None:
        x = torch_vae.decode(x / 0.18215).sample
    return x

  config = port.config_from_diffusers_dit(dict(transformer.config))
  graphdef, _ = models.abstract(network.DiT, config)
  network_fn = Partial(models.apply, graphdef,
                       port.dit_params_from_diffusers(transformer.state_dict(), config))
  latent = None
  if torch_vae is not None:
    vae_config = port.config_from_diffusers_vae(dict(torch_vae.config))
    vae_config.image_shape = (256, 256, 3)
    vae_graph, _ = models.abstract(vae.AutoencoderKL, vae_config)
    latent = pipeline.latent_space(
        vae_config, vae_graph, port.vae_params_from_diffusers(torch_vae.state_dict(), vae_config))
  sampling_defaults = dict(method="ddim", num_steps=args.steps, eta=0.0,
                           timestep_spacing="leading", clip_denoised=False)
  model = pipeline.Pipeline(
      eps_fn=Partial(pipeline.eps_channels, network_fn), denoiser_fn=network_fn,
      learned_variance=True, schedule=schedules.get("linear", 1000), num_classes=1000,
      null_label=1000, image_shape=(32, 32, 4), latent=latent,
      config=ml_collections.ConfigDict({"sampling": sampling_defaults}))
  model = sharded_sampling.replicate_model(model, distributed.data_mesh())

  def run_jax(seed):
    return sharded_sampling.sample_sharded(jax.random.key(seed), model, labels,
                                           guidance_scale=scale)

  print(f"{args.model}: {models.count_params(network_fn.args[1]):,} parameters; batch "
        f"{args.batch}, {args.steps} CFG DDIM steps (both passes: {2 * args.batch} per step), "
        f"scale {scale:g}{', SD VAE decode' if args.vae else ', no VAE decode'}")
  started = time.perf_counter()
  run_jax(0)
  print(f"cfg-jax compile + first run: {time.perf_counter() - started:.1f} s")
  best = machine.interleaved_best({"diffusers": lambda _: run_torch(), "cfg-jax": run_jax},
                                  args.rounds)
  rate = {name: args.batch / seconds for name, seconds in best.items()}
  for name, value in rate.items():
    print(f"{name:10s} {value:8.3f} images/s ({best[name] / args.steps * 1e3:.0f} ms per step)")
  print(f"cfg-jax / diffusers: {rate['cfg-jax'] / rate['diffusers']:.2f}x "
        f"(torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"{torch.get_num_threads()} threads)")
  print(machine.load())


if __name__ == "__main__":
  main()
