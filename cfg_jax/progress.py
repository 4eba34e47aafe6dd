"""Lines for the person running a job ("Resuming diffusion from step 800.").

The library only emits them, as INFO records of the standard logger "cfg_jax.progress"; the
command-line tools show them on the console (`cfg_jax.app.console`), and a library caller
sees them wherever its logging goes.
"""

from __future__ import annotations

import logging

from cfg_jax import distributed

LOGGER = logging.getLogger("cfg_jax.progress")
LOGGER.setLevel(logging.INFO)


def say(message: str) -> None:
  """One line, prefixed with the process when several share the job."""
  LOGGER.info(distributed.speaker() + message)
