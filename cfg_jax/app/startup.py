"""What every command-line entry point does: start-up (XLA flags, the compilation cache,
multi-host, a quiet console), flag parsing, and user errors that end in one line on stderr
with exit status 2."""

from __future__ import annotations

import os
import sys

from cfg_jax import distributed, errors, paths
from cfg_jax.app import command_flags, console, xla_flags


def tune_allocator():
  """Stops glibc from returning freed memory to the OS after every step.

  XLA on CPU frees and reallocates its large buffers each step; with glibc's defaults each
  cycle goes through mmap/munmap and page faults. Keeping them in the heap made CPU
  training about 15-20% faster here. A no-op where glibc is absent (macOS, Windows).
  """
  import ctypes
  import ctypes.util

  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError, TypeError):
    return
  m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
  mallopt(m_trim_threshold, 1 << 30)
  mallopt(m_mmap_threshold, 1 << 30)


def parse_flags_or_exit(argv):
  """absl's flag parsing, but a bad flag is one line on stderr and exit status 2."""
  from absl import flags

  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit_with(e)
  except (AttributeError, KeyError) as e:  # ml_collections: --config.X of a field not there
    field = str(e).strip("\"'")
    _exit_with(f"the config has no field {field!r} to override (--config.…{field}); see the "
               "config file for its fields.")


def config_value(holder):
  """The `--config` flag's ConfigDict; a file that cannot be loaded is a ConfigError."""
  try:
    config = holder.value
    config.get("seed")  # a file that failed to load raises on first use, not on .value
    return config
  except OSError as e:  # ml_collections loads the file lazily, on first access
    raise errors.ConfigError(f"cannot load the --config file ({str(e).splitlines()[-1].strip()});"
                             " pass an existing file, e.g. --config configs/digits.py.") from None


def enable_compilation_cache() -> None:
  """Keeps compiled programs in the user's cache (`$XDG_CACHE_HOME/cfg_jax/jax`, by default
  ~/.cache/cfg_jax/jax), so a second run skips most compilation (the train step alone takes
  ~10 s to compile on a 2-core CPU). A cache directory the user configured for JAX is kept;
  CFG_JAX_COMPILATION_CACHE=0 turns this off."""
  import jax

  if os.environ.get("CFG_JAX_COMPILATION_CACHE", "1") == "0" or \
      jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.join(paths.user_cache_dir(), "jax"))


def start(argv):
  """What every entry point does first: reject stray arguments, set the XLA:CPU flags
  (before anything starts JAX's backend), join the other processes of a multi-host job,
  quiet the console (details with --verbosity=1), and keep freed memory in the heap.

  A stray argument or a malformed multi-process environment ends as any user error does:
  one line on stderr, exit status 2.
  """
  run_or_exit(lambda: reject_arguments(argv))
  xla_flags.configure()
  enable_compilation_cache()
  run_or_exit(lambda: distributed.maybe_initialize(command_flags.FLAGS.multihost))
  FLAGS = command_flags.FLAGS
  console.setup(verbose=FLAGS["verbosity"].present and FLAGS.verbosity >= 1)
  tune_allocator()


def reject_arguments(argv) -> None:
  """Every input is a flag: anything after the program name is an InputError."""
  if len(argv) > 1:
    raise errors.InputError(f"unexpected argument(s) {' '.join(argv[1:])!r}; every option is "
                            "a flag, e.g. --workdir runs/x (see --help).")


def run_or_exit(fn):
  """`fn()`; a `UserError` becomes one line on stderr and exit status 2. Any other
  exception is a bug and keeps its traceback."""
  try:
    return fn()
  except errors.UserError as e:
    _exit_with(e)


def _exit_with(message) -> None:
  text = " ".join(str(message).split())  # one line, whatever the message holds
  print(f"error: {text}", file=sys.stderr)
  sys.exit(2)
