"""Converts released PyTorch checkpoints into a workdir that sample.py, sweep.py and
`cfg_jax.load` read like a trained one (needs `pip install -e '.[convert]'`).

  python convert.py guided-diffusion --diffusion 64x64_diffusion.pt \
      --classifier 64x64_classifier.pt --workdir runs/adm64 --preset 64x64
  python convert.py guided-diffusion --diffusion 256x256_diffusion_uncond.pt \
      --classifier 256x256_classifier.pt --workdir runs/adm256u $MODEL_FLAGS $CLASSIFIER_FLAGS
  python convert.py dit --pretrained DiT-XL-2-256 --workdir runs/dit256
  python convert.py dit --checkpoint DiT-XL-2-256x256.pt --vae sd-vae-ft-ema --workdir runs/dit

guided-diffusion's own model and classifier flags (its names, `--flag value`) follow the
options above and override the preset's. Sampling afterwards is pure JAX.
"""

import sys

from cfg_jax.app import startup


def main(argv):
  from cfg_jax.app import console, convert_job

  console.setup()
  options, flag_argv = startup.run_or_exit(lambda: convert_job.parse_args(argv[1:]))
  startup.run_or_exit(lambda: convert_job.convert(options, flag_argv))
  print(f"Wrote {options.workdir}; sample it with: python sample.py --workdir "
        f"{options.workdir}")


if __name__ == "__main__":
  main(sys.argv)
