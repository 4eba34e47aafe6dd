"""The application shell: what the command-line tools add around the library.

`startup` (what every entry point does first), `console`, `command_flags` (the shared flags and
the guidance rule they describe), `config_checks`, `locking` (the workdir lock), `xla_flags`,
`files` (`.npz` and PNG files), and one job per entry point: `train_job` (train.py),
`sample_job` (sample.py), `sweep_job` (sweep.py), `evaluate_job` (evaluate.py).

The library core (everything in `cfg_jax` outside `app` and `evaluation`) never imports
from here; `tests/test_layering.py` keeps it so.
"""
