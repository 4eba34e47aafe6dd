"""The one error class a user can cause, and its kinds.

Every mistake a person can fix (a bad flag, config, input file or workdir) raises a
`UserError`; the command-line tools print its message as one line and exit with status 2.
Anything else is a bug and keeps its traceback. `UserError` is a `ValueError`, so library
callers that catch `ValueError` keep working.
"""


class UserError(ValueError):
  """A problem the user can fix; the message names the problem and the fix."""


class ConfigError(UserError):
  """A config value that cannot work (checked before any data is read or code compiled)."""


class InputError(UserError):
  """A bad argument or input file (flags, labels, an `.npz` of samples)."""


class OutputExistsError(UserError, FileExistsError):
  """An output that exists and would be replaced without `--overwrite`."""


class MissingFileError(UserError, FileNotFoundError):
  """An input file or folder that does not exist."""


class WorkdirLockedError(UserError):
  """Another process holds the workdir."""


class NonFiniteError(UserError):
  """NaN or infinite values where images or metrics belong."""
