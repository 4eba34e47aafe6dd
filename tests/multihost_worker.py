"""One process of `test_multihost.py`: trains the tiny config, resumes it, samples.

  python -m tests.multihost_worker WORKDIR OUT.npz

Joins the other processes when JAX_COORDINATOR_ADDRESS (and JAX_NUM_PROCESSES,
JAX_PROCESS_ID) are set. Process 0 writes the losses, parameters and samples to OUT.npz.
"""

import json
import os
import sys

import numpy as np

from cfg_jax import distributed

NUM_SAMPLES = 6  # divides neither 4 devices nor 1·4: exercises the padding


def main(workdir: str, out: str) -> None:
  distributed.maybe_initialize()
  import jax

  from cfg_jax.app import console

  console.setup()  # console lines on stderr, as the entry points show them

  from cfg_jax import data, pipeline, sharded_sampling
  from cfg_jax.train import denoiser
  from configs import digits_tiny

  config = digits_tiny.get_config()
  split = data.load_split("digits", "train")
  config.train.num_steps = 2
  denoiser.train(config, workdir, split)  # checkpoint at step 2, then the process "stops"
  config.train.num_steps = 4
  _, state = denoiser.train(config, workdir, split)  # resumes from the step-2 checkpoint
  model = pipeline.load(workdir)
  labels = np.arange(NUM_SAMPLES) % 10
  samples = sharded_sampling.sample_batches(jax.random.key(7), model, labels, batch_size=NUM_SAMPLES,
                              num_steps=3, guidance_scale=2.0)
  if not distributed.is_main():
    return
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  leaves = jax.tree_util.tree_leaves(jax.device_get((state.params, state.ema_params)))
  np.savez(out, losses=[l["diffusion/loss"] for l in lines], steps=[l["step"] for l in lines],
           samples=samples, devices=jax.device_count(), processes=jax.process_count(),
           **{f"leaf{i}": np.asarray(v) for i, v in enumerate(leaves)})


if __name__ == "__main__":
  main(*sys.argv[1:])
