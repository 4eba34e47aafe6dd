"""Every path under a workdir (its one definition), and writing files there safely.

A workdir is what `train.py` writes and `cfg_jax.load` reads:

| path                           | what                                              |
| ------------------------------ | ------------------------------------------------- |
| `checkpoints/`                 | Orbax checkpoints of the ε-network (and its EMA)  |
| `classifier/`                  | Orbax checkpoints of the noisy classifier         |
| `metrics.jsonl`                | one JSON record per logged step                   |
| `tensorboard/`                 | TensorBoard event files of the same metrics       |
| `train.log`                    | process 0's full log (`train.process{i}.log`)     |
| `train.lock`                   | held while a run trains here                      |
| `samples_cfg_{γ}.png`          | the main job's sample grids, one row per class    |
| `samples_classifier_{s}.png`   | the same under classifier guidance                |
| `sweep/`                       | `sweep.py`'s `sweep.json`, `sweep.csv`, `sweep.png` |

What the project rebuilds on demand (compiled programs, the evaluation network) lives in the
user cache instead, `$XDG_CACHE_HOME/cfg_jax` (by default ~/.cache/cfg_jax).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from cfg_jax import errors

DIFFUSION_CHECKPOINTS = "checkpoints"
CLASSIFIER_CHECKPOINTS = "classifier"
VAE_CHECKPOINTS = "vae"  # a latent model's autoencoder
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
LOG = "train.log"
LOCK = "train.lock"
SWEEP = "sweep"
SWEEP_TABLE, SWEEP_CSV, SWEEP_PLOT = "sweep.json", "sweep.csv", "sweep.png"
SWEEP_FILES = (SWEEP_TABLE, SWEEP_CSV, SWEEP_PLOT)


def diffusion_checkpoints(workdir: str) -> str:
  return os.path.join(workdir, DIFFUSION_CHECKPOINTS)


def classifier_checkpoints(workdir: str) -> str:
  return os.path.join(workdir, CLASSIFIER_CHECKPOINTS)


def vae_checkpoints(workdir: str) -> str:
  return os.path.join(workdir, VAE_CHECKPOINTS)


def metrics_file(workdir: str) -> str:
  return os.path.join(workdir, METRICS)


def tensorboard_dir(workdir: str) -> str:
  return os.path.join(workdir, TENSORBOARD)


def log_file(workdir: str, process_index: int = 0) -> str:
  """Process 0's log is `train.log`; process i > 0 writes `train.process{i}.log`."""
  return os.path.join(workdir, f"train.process{process_index}.log" if process_index else LOG)


def lock_file(workdir: str) -> str:
  return os.path.join(workdir, LOCK)


def sample_grid(workdir: str, guidance: str, scale: float) -> str:
  """`samples_cfg_3.png` (guidance "cfg", γ = 3) or `samples_classifier_4.png`."""
  return os.path.join(workdir, f"samples_{guidance}_{scale:g}.png")


def sweep_dir(workdir: str) -> str:
  return os.path.join(workdir, SWEEP)


def user_cache_dir() -> str:
  """$XDG_CACHE_HOME/cfg_jax, by default ~/.cache/cfg_jax."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "cfg_jax")


class UnusablePathError(errors.UserError):
  """An output path that cannot be written: a file where a folder must be, or no permission."""


def check_folder_usable(folder: str, what: str, fix: str = "choose another output path") -> None:
  """Raises `UnusablePathError` ("cannot write `what`: ...; `fix`.") unless `folder` is a
  writable folder or could be made one.

  Creates nothing: a folder made now would outlive a run that fails before writing to it.
  """
  existing = os.path.abspath(folder)
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UnusablePathError(f"cannot write {what}: {existing} is not a folder; {fix}.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UnusablePathError(f"cannot write {what}: {existing} is not writable; {fix}.")


def make_folder(folder: str, fix: str = "choose another output path") -> None:
  """`os.makedirs(folder, exist_ok=True)`, with a file in the way or a missing permission
  as an `UnusablePathError`."""
  try:
    os.makedirs(folder, exist_ok=True)
  except (FileExistsError, NotADirectoryError, PermissionError) as e:
    raise UnusablePathError(f"cannot create the folder {folder} ({e.strerror}); {fix}.") from None


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
  """Yields a temporary path beside `path`, renamed onto it if the block succeeds, so a
  failure never leaves a half-written file."""
  directory = os.path.dirname(os.path.abspath(path))
  make_folder(directory)
  try:
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=directory, prefix=".tmp-")
  except PermissionError as e:
    raise UnusablePathError(f"cannot write in {directory} ({e.strerror}); choose another output "
                            "path.") from None
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
