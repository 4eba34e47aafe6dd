"""What a person sees on the console: a few plain lines and one progress bar per stage.

Details (library chatter, per-step numbers) go to absl logging, which the entry points keep
off the console unless `--verbosity=1` and write in full to a log file in the workdir.
"""

from __future__ import annotations

import logging as std_logging
import sys

from absl import logging

from cfg_jax import distributed


def details_on_console() -> bool:
  """True when the console already shows INFO logs (`--verbosity=1`)."""
  return logging.get_absl_handler().level <= std_logging.INFO


def say(message: str) -> None:
  """A line for the person at the console (and the log file), prefixed with the process
  when several share the job."""
  message = distributed.speaker() + message
  logging.info(message)
  if not details_on_console():
    print(message, file=sys.stderr, flush=True)


def setup(verbose: bool = False) -> None:
  """Library INFO logs stay off the console unless `verbose`; absl keeps them for files."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().setLevel(std_logging.INFO if verbose else std_logging.WARNING)
  # Orbax logs every save at INFO; keep that out even of the file log.
  std_logging.getLogger("orbax").setLevel(std_logging.WARNING)
  try:
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # the embedded set prepares in a second; no shuffling bars
  except ImportError:
    pass


def log_to_file(path: str) -> None:
  """Appends every INFO-or-higher record of this process to `path` (e.g. workdir/train.log)."""
  handler = std_logging.FileHandler(path)
  handler.setLevel(std_logging.INFO)
  handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  std_logging.getLogger().addHandler(handler)
