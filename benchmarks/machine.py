"""The machine a benchmark ran on, as one line (a helper of the scripts in this folder).

Every benchmark prints `describe()` first, so a pasted result names its CPU, its JAX devices
and versions, and `load()` last, since a shared machine's load average decides how far its
numbers can be trusted. `interleaved_best` times two or more ways of doing the same work in
alternation, so that each sees the same load.
"""

from __future__ import annotations

import os
import platform
import time


def cpu_model() -> str:
  """The CPU's model name (Linux /proc/cpuinfo, else `platform.processor()`)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown CPU"


def describe() -> str:
  """"Intel(R) Xeon(R) ..., 2 cores | JAX 0.10.2 (jaxlib 0.10.2) on 2x cpu | XLA_FLAGS=..."."""
  import jax
  import jaxlib

  devices = jax.devices()
  return (f"machine: {cpu_model()}, {os.cpu_count()} cores | JAX {jax.__version__} (jaxlib "
          f"{jaxlib.__version__}) on {len(devices)}x {devices[0].device_kind} | "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")


def load() -> str:
  """The 1-minute load average against the core count (above the core count: shared)."""
  try:
    average = os.getloadavg()[0]
  except OSError:
    return "load average: unknown"
  cores = os.cpu_count() or 1
  note = " (other jobs shared the cores: rerun before trusting small differences)" \
      if average > cores else ""
  return f"load average at the end: {average:.2f} on {cores} cores{note}"


def interleaved_best(runs: dict, rounds: int) -> dict:
  """{name: best seconds of `rounds` calls of runs[name](round)}, the runs interleaved in
  each round so every one sees the same machine load."""
  best = dict.fromkeys(runs, float("inf"))
  for round_ in range(rounds):
    for name, run in runs.items():
      started = time.perf_counter()
      run(round_)
      best[name] = min(best[name], time.perf_counter() - started)
  return best
