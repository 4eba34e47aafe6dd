"""Advisory `fcntl` locks on files: they die with the process, so `kill -9` leaves none."""

from __future__ import annotations

import contextlib
import fcntl
import os

from cfg_jax import errors, paths


@contextlib.contextmanager
def exclusive(path: str, wait: bool = False, what: str = "this workdir"):
  """Holds an exclusive lock on `path` (created if absent) for the block.

  With `wait=False` a lock held elsewhere raises `WorkdirLockedError` at once, naming the
  PID that holds it; with `wait=True` the block waits its turn. A path that cannot hold the
  lock (a file where its folder should be, no permission) raises `paths.UnusablePathError`.
  """
  fix = "choose another folder"
  paths.make_folder(os.path.dirname(os.path.abspath(path)), fix)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
    raise paths.UnusablePathError(f"cannot create the lock file {path} for {what} ({e.strerror}); "
                               f"{fix}.") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
      raise errors.WorkdirLockedError(
          f"{what} is in use by process {holder} (lock {path}); wait for it to finish, "
          "or use another --workdir.") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    yield
  finally:
    os.close(fd)  # closing releases the lock
