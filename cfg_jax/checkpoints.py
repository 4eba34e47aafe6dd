"""Orbax checkpoints of a state pytree with the run's config saved beside it."""

from __future__ import annotations

import json
import os
import warnings
from typing import Any, Iterable, Optional

import jax
import orbax.checkpoint as ocp

from cfg_jax import distributed, errors, progress


class CheckpointError(errors.UserError):
  """A checkpoint that is missing, unreadable or made with another config."""


class CheckpointMismatchError(errors.UserError):
  """A checkpoint that reads fine but holds another state (written by other code)."""


def manager(directory: str, max_to_keep: Optional[int] = 3, create: bool = True,
            keep_steps: Iterable[int] = ()):
  """A manager keeping the latest `max_to_keep` checkpoints, and those of `keep_steps` forever
  (e.g. an early model to serve as autoguidance's weak model)."""
  keep_steps = tuple(int(s) for s in keep_steps)
  # A writer (create=True) removes the temporary folders of saves a crash cut short.
  common = dict(create=create, cleanup_tmp_directories=create)
  if not keep_steps:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, **common)
  else:
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(**common, preservation_policy=(
        policies.AnyPreservationPolicy([policies.LatestN(max_to_keep),
                                        policies.CustomSteps(keep_steps)])))
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr, step: int, state, config_dict: dict) -> None:
  """Starts an asynchronous save; `mngr.wait_until_finished()` before the process exits."""
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict)))


def restore(mngr, abstract_state, step: Optional[int] = None):
  """(state, saved config dict) of `step` (default: the latest).

  A checkpoint that cannot be read or decoded raises `CheckpointError`. One that reads fine
  but does not fit `abstract_state` (another tree structure or shape: a code change, not a
  damaged disk) raises `CheckpointMismatchError`, which `resume` does not fall back from.
  """
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"No checkpoint in {mngr.directory}; train one first with "
                          "`python train.py --workdir ...`.")
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), config=ocp.args.JsonRestore()))
  except Exception as e:  # Orbax raises many types (mostly ValueError) for either cause.
    if _readable(str(mngr.directory), step):
      raise CheckpointMismatchError(
          f"The checkpoint at step {step} in {mngr.directory} reads fine but holds another "
          f"state than this code builds ({type(e).__name__}: {str(e).splitlines()[0][:200]});"
          " train in a new --workdir, or use the cfg_jax version that wrote it.") from e
    raise CheckpointError(f"Cannot read the checkpoint at step {step} in {mngr.directory} "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from e
  return restored.state, restored.config


def _readable(directory: str, step: int) -> bool:
  """Whether the state and config of `step` read and decode as saved (no target)."""
  mngr = manager(directory, create=False)  # its own: a manager keeps each item's handler
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # "sharding info not provided": no target, as meant
      mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(),
                                                 config=ocp.args.JsonRestore()))
  except Exception:  # pylint: disable=broad-except
    return False
  finally:
    mngr.close()
  return True


def restore_subtree(directory: str, name: str, abstract_tree, step: Optional[int] = None):
  """Restores only `state.<name>` (e.g. the EMA parameters) into `abstract_tree`.

  A partial restore: the rest of the saved state (optimizer moments, training parameters)
  is never read, and the target needs only shapes and dtypes (`models.abstract`).
  """
  mngr = manager(directory, create=False)
  step = _existing_step(mngr, step)
  target = {name: abstract_tree}
  try:
    restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  except Exception as e:  # Orbax raises many types for a damaged or mismatched checkpoint.
    raise CheckpointError(f"Cannot read {name} from the checkpoint at step {step} in "
                          f"{mngr.directory} ({type(e).__name__}: "
                          f"{str(e).splitlines()[0][:200]}).") from e
  return jax.tree_util.tree_map(jax.numpy.asarray, restored.state[name])


def read_config(directory: str, step: Optional[int] = None) -> dict:
  """The config saved with the checkpoint of `step` (default: the latest) in `directory`,
  without the state."""
  if not os.path.isdir(directory):
    raise CheckpointError(f"No checkpoint directory {directory}; train one first with "
                          "`python train.py --workdir ...`.")
  return _saved_config(manager(directory, create=False), step)


def latest_step(directory: str) -> Optional[int]:
  return manager(directory, create=False).latest_step()


def _existing_step(mngr, step: Optional[int]) -> int:
  """`step` (default: the latest) after checking that it was saved and kept."""
  latest = mngr.latest_step()
  if latest is None:
    raise CheckpointError(f"No checkpoint in {mngr.directory}; train one first with "
                          "`python train.py --workdir ...`.")
  if step is None:
    return latest
  steps = sorted(mngr.all_steps())
  if step not in steps:
    raise CheckpointError(f"No checkpoint of step {step} in {mngr.directory} (it keeps steps "
                          f"{', '.join(map(str, steps))}); pick one of those, or keep it when "
                          f"training with --config.train.keep_steps='({step},)'.")
  return step


def _saved_config(mngr, step: Optional[int] = None) -> dict:
  step = _existing_step(mngr, step)
  try:
    return mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
  except Exception as e:
    raise CheckpointError(f"Cannot read the config saved in {mngr.directory} at step {step} "
                          f"({type(e).__name__}).") from e


def resume(mngr, state, config_dict: dict, keys: Iterable[str]):
  """The latest readable checkpointed state if there is one (else `state`), after checking
  that the config entries `keys` agree with the saved config.

  An unreadable latest checkpoint (a damaged disk, a crash the atomic save did not cover)
  is moved aside (`<dir>-unreadable-step<N>`, kept for inspection; by process 0, while the
  others wait) and the one before it is used, with a message saying so. A readable one that
  does not fit `state` is an error, never moved (see `restore`).
  """
  steps = sorted(mngr.all_steps(), reverse=True)
  for i, step in enumerate(steps):
    try:
      saved = _saved_config(mngr, step)
    except CheckpointError as e:
      failure = e
    else:
      check_compatible(saved, config_dict, keys)  # a contradiction is never skipped
      try:
        return restore(mngr, restore_target(state), step)[0]
      except CheckpointError as e:
        failure = e
    if i + 1 == len(steps):
      raise CheckpointError(f"{failure} No earlier checkpoint to fall back to; remove "
                            f"{mngr.directory} to start over.") from failure
    aside = f"{str(mngr.directory).rstrip(os.sep)}-unreadable-step{step}"
    if distributed.is_main():  # the processes of a job share the workdir: one moves it
      os.replace(os.path.join(str(mngr.directory), str(step)), aside)
    distributed.barrier(f"cfg_jax: {mngr.directory} step {step} moved aside")
    mngr.reload()
    progress.say(f"The checkpoint at step {step} is unreadable ({failure}); moved it to "
                f"{aside} and falling back to step {steps[i + 1]}.")
  return state


def check_resumable(directory: str, config_dict: dict, keys: Iterable[str]) -> None:
  """Read-only early check: raises if the latest checkpoint in `directory` (when there is a
  readable one) was made with other values of `keys`. `resume` checks again."""
  if not os.path.isdir(directory):
    return
  mngr = manager(directory, create=False)
  if mngr.latest_step() is None:
    return
  try:
    saved = _saved_config(mngr)
  except CheckpointError:
    return  # unreadable: `resume` falls back to an earlier checkpoint
  check_compatible(saved, config_dict, keys)


def config_differences(saved: dict, current: dict, keys: Iterable[str]) -> list[str]:
  """"name: saved X, now Y" for each config entry under `keys` that differs.

  `keys` are dotted paths to sections or fields, e.g. ("data.name", "model").
  """
  def lookup(tree, dotted):
    for part in dotted.split("."):
      tree = tree.get(part) if isinstance(tree, dict) else None
    return json.loads(json.dumps(tree))  # tuples and lists compare equal

  def flat(value, prefix):
    if isinstance(value, dict):
      return {k: v for key, sub in value.items() for k, v in flat(sub, f"{prefix}.{key}").items()}
    return {prefix: value}

  diffs = []
  for key in keys:
    old, new = flat(lookup(saved, key), key), flat(lookup(current, key), key)
    for name in sorted(set(old) | set(new)):
      if old.get(name) != new.get(name):
        diffs.append(f"{name}: saved {old.get(name)!r}, now {new.get(name)!r}")
  return diffs


def check_compatible(saved: dict, current: dict, keys: Iterable[str]) -> None:
  """Raises if a config entry that shapes the saved state differs from the current config."""
  diffs = config_differences(saved, current, keys)
  if diffs:
    raise CheckpointError("The config contradicts the checkpoint it would resume ("
                          + "; ".join(diffs) + "); use a new --workdir or the saved values.")


def restore_target(tree: Any):
  """`tree` as jax.ShapeDtypeStructs (with shardings): what Orbax restores into."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
