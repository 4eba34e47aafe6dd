"""XLA:CPU flags that measured faster for this project, set before JAX starts its backend.

XLA reads `XLA_FLAGS` once, when the first backend starts, so `configure()` must run before
any JAX computation (the entry points call it first thing). The numbers behind each choice
are in benchmarks/PERF_FINDINGS.md.
"""

from __future__ import annotations

import importlib.metadata
import os

from absl import logging

from cfg_jax import distributed

# flag name -> value; only flags measured as a win go here (benchmarks/PERF_FINDINGS.md).
# Two host devices on a 2-core CPU: one XLA:CPU device keeps both cores only ~140% busy on
# these small convolutions, while the data-parallel step over two devices keeps them full.
# Measured with benchmarks/vs_pytorch.py on the quiet 2-core machine: training 626 → 918
# images/s (JAX/PyTorch 0.83× → 1.07×); batches must divide by 2 (every config's do).
# YNNPACK fusions off, "-reduce" and --xla_cpu_prefer_vector_width=512 did not win reliably.
CPU_FLAGS: dict = {"xla_force_host_platform_device_count": 2} if (os.cpu_count() or 1) >= 2 \
    else {}

# jaxlib (major, minor) releases on which these flags exist and were measured: an unknown
# flag in XLA_FLAGS aborts the process, so newer releases get none until checked.
TESTED_JAXLIB = {(0, 10)}

def _jaxlib_version():
  try:
    return tuple(int(v) for v in importlib.metadata.version("jaxlib").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return None


def configure(flags: dict | None = None) -> str:
  """Adds `flags` (default CPU_FLAGS) to XLA_FLAGS, only for the CPU backend.

  A flag the user already put in XLA_FLAGS keeps the user's value, so any setting can still
  be A/B tested from the shell; CFG_JAX_XLA_FLAGS=0 in the environment turns this off.
  Does nothing on GPU/TPU, on untested jaxlib releases, or once a JAX backend is running (it
  warns then). Returns the resulting XLA_FLAGS.
  """
  current = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("CFG_JAX_XLA_FLAGS", "1") == "0":  # opt-out, e.g. to A/B XLA's defaults
    return current
  if not distributed.cpu_is_the_backend() or _jaxlib_version() not in TESTED_JAXLIB:
    return current
  from jax._src import xla_bridge  # private, but the only way to ask without starting one

  if getattr(xla_bridge, "backends_are_initialized", lambda: False)():
    logging.warning("cfg_jax.app.xla_flags.configure() ran after JAX started its backend; the "
                    "XLA:CPU flags were not applied.")
    return current
  present = {item.lstrip("-").split("=")[0] for item in current.split()}
  if not (CPU_FLAGS if flags is None else flags):
    return current
  added = [f"--{name}={value}" for name, value in (CPU_FLAGS if flags is None else flags).items()
           if name not in present]
  os.environ["XLA_FLAGS"] = " ".join([current] + added).strip()
  return os.environ["XLA_FLAGS"]
