"""What a person sees on the console: a few plain lines and one progress bar per stage.

Details (library chatter, per-step numbers) go to absl logging, which the entry points keep
off the console unless `--verbosity=1` and write in full to a log file in the workdir.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys

from absl import logging

from cfg_jax import progress


def details_on_console() -> bool:
  """True when the console already shows INFO logs (`--verbosity=1`)."""
  return logging.get_absl_handler().level <= std_logging.INFO


def say(message: str) -> None:
  """A line for the person at the console (and the log file), prefixed with the process
  when several share the job: `cfg_jax.progress.say`, which `setup` shows on stderr."""
  progress.say(message)


class _ProgressOnStderr(std_logging.StreamHandler):
  """Shows `cfg_jax.progress` lines as plain text on stderr, unless absl's handler already
  shows INFO records (`--verbosity=1`)."""

  def __init__(self):
    super().__init__(sys.stderr)
    self.setFormatter(std_logging.Formatter("%(message)s"))

  def emit(self, record):
    if not details_on_console():
      super().emit(record)


class _QuietLibrary(std_logging.Filter):
  """Drops a library's records below `level`. Orbax logs every save through absl, so a
  logger level cannot reach them; the file each record comes from can."""

  def __init__(self, level: int, package: tuple = ("orbax", "checkpoint")):
    super().__init__()
    # The installed package's path (…/orbax/checkpoint/…), not any folder named "orbax".
    self.level, self.marker = level, os.sep + os.sep.join(package) + os.sep

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= self.level or self.marker not in record.pathname


def setup(verbose: bool = False) -> None:
  """Library INFO logs stay off the console unless `verbose`; absl keeps them for files.

  Orbax's routine records (every save, "waiting for the previous save") stay off the
  console below ERROR, or below WARNING with `verbose`.
  """
  logging.set_verbosity(logging.INFO)
  handler = logging.get_absl_handler()
  handler.setLevel(std_logging.INFO if verbose else std_logging.WARNING)
  for old in [f for f in handler.filters if isinstance(f, _QuietLibrary)]:
    handler.removeFilter(old)  # setup may run twice in one process (tests)
  handler.addFilter(_QuietLibrary(std_logging.WARNING if verbose else std_logging.ERROR))
  shown = progress.LOGGER.handlers
  if not any(isinstance(h, _ProgressOnStderr) for h in shown):
    progress.LOGGER.addHandler(_ProgressOnStderr())
  try:
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()  # the embedded set prepares in a second; no shuffling bars
  except ImportError:
    pass


@contextlib.contextmanager
def logging_to(path: str):
  """Appends every INFO-or-higher record of this process to `path` (e.g. workdir/train.log)
  for the block; orbax's routine INFO records are left out."""
  handler = std_logging.FileHandler(path)
  handler.setLevel(std_logging.INFO)
  handler.addFilter(_QuietLibrary(std_logging.WARNING))
  handler.setFormatter(std_logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  root = std_logging.getLogger()
  root.addHandler(handler)
  try:
    yield
  finally:
    root.removeHandler(handler)
    handler.close()
