"""Sampling throughput of a guidance-distilled student against its two-pass CFG teacher.

  python benchmarks/distilled_vs_teacher.py --teacher runs/digits --student runs/distilled

Both sample the same labels at γ = 3 with the workdirs' sampler (DDIM, 50 steps for
digits), in batches over every device as `sample.py` does (`sharded_sampling.sample_batches`);
the student runs one pass per step, the teacher both passes in one batched call. Prints
images/s of each (best of --rounds, compile excluded) and the ratio.
"""

import argparse

import numpy as np

from cfg_jax.app import startup, xla_flags

import machine


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--teacher", required=True)
  parser.add_argument("--student", required=True)
  parser.add_argument("--num_samples", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--guidance_scale", type=float, default=3.0)
  parser.add_argument("--rounds", type=int, default=3)
  args = parser.parse_args()
  xla_flags.configure()
  startup.tune_allocator()

  import jax

  import cfg_jax
  from cfg_jax import sharded_sampling

  print(machine.describe())
  models = {"teacher (CFG, 2 passes)": cfg_jax.load(args.teacher),
            "student (distilled, 1 pass)": cfg_jax.load(args.student)}
  labels = np.arange(args.num_samples) % models["teacher (CFG, 2 passes)"].num_classes

  def run(model):
    return sharded_sampling.sample_batches(jax.random.key(0), model, labels,
                                           batch_size=args.batch_size,
                                           guidance_scale=args.guidance_scale)

  for model in models.values():
    run(model)  # compile
  best = machine.interleaved_best(
      {name: (lambda _, model=model: run(model)) for name, model in models.items()}, args.rounds)
  rates = {name: args.num_samples / seconds for name, seconds in best.items()}
  for name, rate in rates.items():
    print(f"{name:28s} {rate:8.1f} images/s")
  teacher, student = rates.values()
  print(f"student / teacher: {student / teacher:.2f}x at γ = {args.guidance_scale:g}")
  print(machine.load())


if __name__ == "__main__":
  main()
