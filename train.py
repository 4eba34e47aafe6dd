"""Trains a classifier-free-guided diffusion model (and its noisy classifier).

  python train.py                                   # the embedded digits default
  python train.py --config configs/digits.py --workdir runs/digits --config.train.num_steps=4000
  srun python train.py --multihost --workdir /shared/runs/x     # one process per host (SLURM)
"""

import os

from absl import app, flags
from ml_collections import config_flags

from cfg_jax.app import startup

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "digits.py"),
    "Experiment config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "Where checkpoints, metrics and "
                               "samples go; running again resumes from its latest checkpoint.")


def main(argv):
  startup.start(argv)
  from cfg_jax.app import train_job

  config = startup.run_or_exit(lambda: startup.config_value(_CONFIG))
  startup.run_or_exit(lambda: train_job.train_and_evaluate(config, _WORKDIR.value))


if __name__ == "__main__":
  app.run(main, flags_parser=startup.parse_flags_or_exit)
