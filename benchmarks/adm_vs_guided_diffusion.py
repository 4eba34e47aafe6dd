"""Classifier-guided DDPM with OpenAI's ADM at a released size, cfg-jax against
guided-diffusion's own sampler, interleaved in one process.

  python benchmarks/adm_vs_guided_diffusion.py                 # 64x64 preset, full width
  python benchmarks/adm_vs_guided_diffusion.py --quick         # checks that it runs

Both sides sample the same random-weight network (every weight perturbed, since ADM
zero-initialises its output layers): guided-diffusion as `scripts/classifier_sample.py`
does (`p_sample_loop` with the conditional model, `cond_fn` the classifier's log-probability
gradient, learned variance), cfg-jax as `sample.py` does on a converted workdir
(`sharded_sampling.sample_sharded`: DDPM on the "linspace" grid with the learned variance and
the classifier gradient in one compiled `lax.scan`, the batch split over every device). Prints images/s of each, best of
--rounds, and the ratio. Needs torch and guided-diffusion-sdk (`pip install -e
'.[reference]'`).
"""

import argparse
import time

import numpy as np

from cfg_jax.app import startup, xla_flags

import machine


def _perturb(model, torch, seed):
  """Every weight random, activations O(1): GroupNorm scales ~1, weights ~ N(0, 1/fan_in)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1:
        scale = 1.0 if name.endswith("weight") else 0.0
        p.copy_(scale + 0.1 * noise)
      elif name.endswith("positional_embedding"):
        p.copy_(noise)
      else:
        p.copy_(noise / p[0].numel() ** 0.5)
  return model.eval()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="64x64")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--steps", type=int, default=10, help="respaced DDPM steps per run")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--quick", action="store_true", help="a narrow 64x64 model, 2 steps")
  args = parser.parse_args()
  xla_flags.configure()
  startup.tune_allocator()

  import inspect

  import jax
  import torch
  from guided_diffusion import script_util
  from jax.tree_util import Partial

  import ml_collections

  from cfg_jax import distributed, models, pipeline, schedules, sharded_sampling
  from cfg_jax.models.adm import network, port, presets

  print(machine.describe())
  gd_flags = presets.preset_flags(args.preset)
  gd_flags["use_fp16"] = gd_flags["classifier_use_fp16"] = False  # float32 on the CPU
  if args.quick:
    gd_flags.update(num_channels=32, num_head_channels=32, num_res_blocks=1,
                    classifier_width=64, classifier_depth=1)
    args.steps, args.rounds, args.batch = 2, 1, 2
  pick = lambda fn: {k: gd_flags[k] for k in inspect.signature(fn).parameters}
  torch_model = _perturb(script_util.create_model(**pick(script_util.create_model)), torch, 1)
  torch_classifier = _perturb(
      script_util.create_classifier(**pick(script_util.create_classifier)), torch, 2)
  diffusion = script_util.create_gaussian_diffusion(
      steps=gd_flags["diffusion_steps"], learn_sigma=True,
      noise_schedule=gd_flags["noise_schedule"], timestep_respacing=str(args.steps))
  scale, size = gd_flags["classifier_scale"], gd_flags["image_size"]
  labels = np.arange(args.batch) * 97 % 1000

  def cond_fn(x, t, y):  # scripts/classifier_sample.py's
    with torch.enable_grad():
      x_in = x.detach().requires_grad_(True)
      log_probs = torch.log_softmax(torch_classifier(x_in, t), dim=-1)
      selected = log_probs[range(len(log_probs)), y.view(-1)]
      return torch.autograd.grad(selected.sum(), x_in)[0] * scale

  def run_torch():
    with torch.no_grad():
      return diffusion.p_sample_loop(
          lambda x, t, y: torch_model(x, t, y), (args.batch, 3, size, size),
          cond_fn=cond_fn, model_kwargs={"y": torch.from_numpy(labels)}, device="cpu",
          progress=False)

  model_config = presets.model_config(gd_flags)
  classifier_config = presets.classifier_config(gd_flags)
  eps_graph, _ = models.abstract(network.UNetModel, model_config)
  cls_graph, _ = models.abstract(network.EncoderUNetModel, classifier_config)
  network_fn = Partial(models.apply, eps_graph, port.to_params(torch_model.state_dict(),
                                                               model_config))
  classifier_fn = Partial(models.apply, cls_graph,
                          port.to_params(torch_classifier.state_dict(), classifier_config))
  # The model as `cfg_jax.load` gives a converted workdir, sampled as sample.py samples it:
  # the batch split over every device.
  sampling_defaults = dict(method="ddpm", num_steps=args.steps, eta=0.0,
                           timestep_spacing="linspace", classifier_scale=scale)
  model = pipeline.Pipeline(
      eps_fn=Partial(pipeline.eps_channels, network_fn), denoiser_fn=network_fn,
      learned_variance=True, classifier_fn=classifier_fn,
      schedule=schedules.get(gd_flags["noise_schedule"], gd_flags["diffusion_steps"]),
      num_classes=presets.NUM_CLASSES, null_label=None, image_shape=(size, size, 3),
      config=ml_collections.ConfigDict({"sampling": sampling_defaults}))
  model = sharded_sampling.replicate_model(model, distributed.data_mesh())

  def run_jax(seed):
    return sharded_sampling.sample_sharded(jax.random.key(seed), model, labels)

  print(f"{args.preset} ({'narrow, --quick' if args.quick else 'full width'}): "
        f"{models.count_params(network_fn.args[1]):,} + "
        f"{models.count_params(classifier_fn.args[1]):,} parameters; batch {args.batch}, "
        f"{args.steps} DDPM steps, classifier scale {scale:g}")
  started = time.perf_counter()
  run_jax(0)
  print(f"cfg-jax compile + first run: {time.perf_counter() - started:.1f} s")
  best = machine.interleaved_best(
      {"guided-diffusion": lambda _: run_torch(), "cfg-jax": run_jax}, args.rounds)
  rate = {name: args.batch / seconds for name, seconds in best.items()}
  for name, value in rate.items():
    print(f"{name:17s} {value:8.3f} images/s ({best[name] / args.steps * 1e3:.0f} ms per step)")
  print(f"cfg-jax / guided-diffusion: {rate['cfg-jax'] / rate['guided-diffusion']:.2f}x "
        f"(torch {torch.__version__}, {torch.get_num_threads()} threads)")
  print(machine.load())


if __name__ == "__main__":
  main()
