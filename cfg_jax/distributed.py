"""Several processes (hosts) as one JAX program: start-up, who writes files, and placing
host data on a mesh that spans every process.

One process per host runs the same program; `jax.distributed.initialize()` joins them.
`maybe_initialize` does that when the environment asks for it:

* `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (a plain launch, e.g.
  two processes on one machine), or
* `--multihost` (`multihost=True`): JAX detects SLURM, Open MPI, TPU pod slices and other
  managed clusters itself.

With neither, nothing happens and the program runs on one host.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cfg_jax import errors

ENV_ADDRESS, ENV_COUNT, ENV_ID = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def requested(multihost: bool = False) -> bool:
  """Whether this run is meant to span several processes."""
  return multihost or bool(os.environ.get(ENV_ADDRESS))


def maybe_initialize(multihost: bool = False) -> bool:
  """Joins the other processes when asked (see the module docstring); True if it did.

  Must run before anything touches a JAX backend. Safe to call twice.
  """
  if jax.distributed.is_initialized():
    return True
  if not requested(multihost):
    return False
  if cpu_is_the_backend():
    # Cross-process collectives on CPU need an implementation; gloo ships with jaxlib.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if os.environ.get(ENV_ADDRESS):  # explicit variables win over cluster auto-detection
    try:
      kwargs = dict(coordinator_address=os.environ[ENV_ADDRESS],
                    num_processes=int(os.environ[ENV_COUNT]),
                    process_id=int(os.environ[ENV_ID]))
    except (KeyError, ValueError):
      raise errors.InputError(f"{ENV_ADDRESS} is set, so {ENV_COUNT} and {ENV_ID} must be "
                              f"integers too (got {os.environ.get(ENV_COUNT)!r}, "
                              f"{os.environ.get(ENV_ID)!r}).") from None
  jax.distributed.initialize(**kwargs)
  if cpu_is_the_backend():
    # Gloo gives peers 30 s to join a new communicator. Made now, while every process is
    # at the same line; made at the first train step, one slow compile could exceed it.
    barrier("cfg_jax: all processes joined")
  return True


# JAX's accelerator plugins: with none installed (and no JAX_PLATFORMS), JAX runs on its CPU.
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin",
                       "jax_rocm60_plugin", "libtpu")


def cpu_is_the_backend() -> bool:
  """Whether JAX will run on its CPU backend, judged without starting any backend."""
  platforms = os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or ""
  if platforms.strip():
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not any(importlib.util.find_spec(name) for name in ACCELERATOR_PLUGINS)


def data_mesh(devices=None):
  """A 1-D mesh over every device JAX sees (or the given ones), axis name "data"."""
  devices = jax.devices() if devices is None else devices
  # Auto axes: XLA propagates the batch sharding through the model (GSPMD).
  return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


def process_index() -> int:
  """This process's index; 0 without touching a backend when no cluster was joined."""
  return jax.process_index() if jax.distributed.is_initialized() else 0


def process_count() -> int:
  return jax.process_count() if jax.distributed.is_initialized() else 1


def is_main() -> bool:
  """Process 0 writes what must be written once: metrics, grids, .npz files."""
  return process_index() == 0


def speaker() -> str:
  """"[process 1/4] " when several processes share the console, else ""."""
  count = process_count()
  return f"[process {process_index()}/{count}] " if count > 1 else ""


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name`; nothing on one process."""
  if process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


class _Silent:
  """Stands in for a writer on processes other than 0: every method does nothing."""

  def __getattr__(self, name):
    return lambda *args, **kwargs: None


def on_main(factory: Callable[..., Any], *args, **kwargs):
  """`factory(*args, **kwargs)` on process 0; elsewhere an object that ignores all calls."""
  return factory(*args, **kwargs) if is_main() else _Silent()


def local_rows(sharding: NamedSharding, global_rows: int) -> slice:
  """The rows of a (global_rows, ...) batch that this process's devices hold.

  The mesh decides which rows live where, so each process reads exactly those and no
  more; the global batch is the same for any number of processes.
  """
  starts, stops = [], []
  for index in sharding.addressable_devices_indices_map((global_rows,)).values():
    rows = index[0]
    starts.append(rows.start or 0)
    stops.append(global_rows if rows.stop is None else rows.stop)
  start, stop = min(starts), max(stops)
  if (stop - start) * process_count() != global_rows and not sharding.is_fully_replicated:
    raise ValueError(f"This process's devices hold rows {start}..{stop} of {global_rows}, "
                     "not one contiguous equal share; use a 1-D mesh over jax.devices().")
  return slice(start, stop)


def put_global(value, sharding: NamedSharding) -> jax.Array:
  """A host array (the same on every process) → a global array with `sharding`.

  Each process copies only the shards its devices hold; no process needs the others'.
  """
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def to_host(x) -> np.ndarray:
  """A global array → the whole numpy array on every process (an all-gather across hosts)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def replicate_tree(tree, mesh):
  """Every array leaf of `tree` replicated over `mesh` (left as is when it already is)."""
  sharding = NamedSharding(mesh, P())

  def place(x):
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    if isinstance(x, jax.Array) and (process_count() == 1 or not x.committed):
      return jax.device_put(x, sharding)  # keeps weak types: the jitted step won't retrace
    if isinstance(x, (jax.Array, np.ndarray)):
      # Committed to one local device (e.g. restored): device_put cannot reach other hosts.
      return put_global(x, sharding)
    return x

  return jax.tree_util.tree_map(place, tree)
