"""What the entry points share, checked in process: stray arguments, config checks made
before any work, the console's filter on Orbax's chatter, and a failed first run's workdir."""

import logging as std_logging
import os

import pytest
from absl import logging

from cfg_jax import errors
from cfg_jax.app import config_checks, console, startup


def test_a_stray_argument_is_an_input_error():
  startup.reject_arguments(["train.py"])
  with pytest.raises(errors.InputError, match="unexpected argument.*'extra'.*--help"):
    startup.reject_arguments(["train.py", "extra"])


# A config value that cannot work, and the text of the one-line error it must give. train.py
# calls `validate` first, before any data or compile (tests/test_bad_inputs.py runs one such
# case through the command line).
BAD_CONFIGS = {
    "p_uncond 1.5": ({"diffusion.p_uncond": 1.5}, "p_uncond"),
    "p_uncond -0.1": ({"diffusion.p_uncond": -0.1}, "p_uncond"),
    "batch 0": ({"train.batch_size": 0}, "train.batch_size"),
    "log_every 0": ({"train.log_every": 0}, "train.log_every"),
    "checkpoint_every 0": ({"train.checkpoint_every": 0}, "train.checkpoint_every"),
    "num_heads 3": ({"model.num_heads": 3}, "model.num_heads"),
    "num_groups 3": ({"model.num_groups": 3}, "model.num_groups"),
    "too many levels": ({"model.channel_mult": (1, 1, 1, 1, 1)}, "divisible by 2^4"),
    "unknown schedule": ({"diffusion.schedule": "quadratic"}, "unknown"),
    "short linear": ({"diffusion.schedule": "linear", "diffusion.num_timesteps": 10},
                     "num_timesteps >= 20"),
    "classifier batch 0": ({"classifier.batch_size": 0}, "classifier.batch_size"),
    "negative lr": ({"optimizer.learning_rate": -1.0}, "optimizer.learning_rate"),
    "unknown dtype": ({"train.dtype": "float16"}, "train.dtype"),
    "unknown lr decay": ({"optimizer.decay": "linear"}, "optimizer.decay"),
    "cosine, no steps left": ({"optimizer.decay": "cosine", "optimizer.warmup_steps": 100000},
                              "optimizer.warmup_steps"),
    "sampling steps 0": ({"sampling.num_steps": 0}, "sampling.num_steps"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_a_bad_config_value_is_one_line_naming_the_field(tiny_config, name):
  values, text = BAD_CONFIGS[name]
  for field, value in values.items():
    section, key = field.rsplit(".", 1)
    tiny_config[section][key] = value
  with pytest.raises(errors.ConfigError) as info:
    config_checks.validate(tiny_config)
  assert text in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("keep_steps", [("x",), (-1,), (0,), (1.5,), (True,)])
def test_keep_steps_must_be_step_numbers(tiny_config, keep_steps):
  tiny_config.unlock()
  tiny_config.train.keep_steps = keep_steps
  with pytest.raises(errors.ConfigError, match=r"config.train.keep_steps must be step numbers"):
    config_checks.validate(tiny_config)


def test_keep_steps_of_step_numbers_pass(tiny_config):
  tiny_config.train.keep_steps = (1, 3)
  config_checks.validate(tiny_config)


@pytest.mark.parametrize("gamma,weighting", [(5.0, 5.0), (float("inf"), None), (None, None),
                                             (0.0, "error"), (-1.0, "error")])
def test_min_snr_gamma_inf_or_none_is_the_plain_loss(tiny_config, gamma, weighting):
  from cfg_jax.train import denoiser

  tiny_config.diffusion.min_snr_gamma = gamma
  if weighting == "error":
    with pytest.raises(errors.ConfigError, match="diffusion.min_snr_gamma"):
      config_checks.validate(tiny_config)
    return
  config_checks.validate(tiny_config)
  assert denoiser.min_snr_gamma(tiny_config) == weighting


def test_grid_sampler_options_are_checked_by_the_sampler_up_front(tiny_config):
  tiny_config.sampling.method, tiny_config.sampling.eta = "ddpm", 0.5
  with pytest.raises(errors.ConfigError, match="config.sampling cannot draw the sample grids "
                     r"\(eta applies to method='ddim' only"):
    config_checks.validate(tiny_config)
  tiny_config.sampling.method, tiny_config.sampling.eta = "dpmpp_2m", 0.0
  config_checks.validate(tiny_config)  # every method the sampler knows


def test_batches_must_divide_over_the_devices(tiny_config):
  tiny_config.train.batch_size = 15
  with pytest.raises(errors.ConfigError, match=r"train.batch_size \(15\) must be divisible by "
                     "the 2 devices; set --config.train.batch_size to a multiple of 2"):
    config_checks.check_devices(tiny_config, 2)
  tiny_config.train.batch_size = 16
  tiny_config.classifier.batch_size = 12
  with pytest.raises(errors.ConfigError, match="classifier.batch_size"):
    config_checks.check_devices(tiny_config, 8)
  tiny_config.classifier.num_steps = 0  # no classifier: its batch does not matter
  config_checks.check_devices(tiny_config, 8)


def _record(pathname, level):
  return std_logging.LogRecord("absl", level, pathname, 1, "Waiting for previous save", (), None)


def test_orbax_chatter_stays_off_the_console_and_out_of_the_log_file(tmp_path):
  orbax_file = os.path.join("site-packages", "orbax", "checkpoint", "checkpoint_manager.py")
  ours = os.path.join("cfg_jax", "train", "loop.py")
  handler = logging.get_absl_handler()
  try:
    console.setup()
    console.setup()  # twice in one process: still one filter
    assert not handler.filter(_record(orbax_file, std_logging.WARNING))
    assert handler.filter(_record(orbax_file, std_logging.ERROR))
    assert handler.filter(_record(ours, std_logging.WARNING))
    console.setup(verbose=True)
    assert handler.filter(_record(orbax_file, std_logging.WARNING))
    assert not handler.filter(_record(orbax_file, std_logging.INFO))
  finally:
    console.setup()
  path = tmp_path / "train.log"
  with console.logging_to(str(path)):
    logging.info("our detail")  # absl records carry the caller's file, here this test's
    file_handler = std_logging.getLogger().handlers[-1]
    assert not file_handler.filter(_record(orbax_file, std_logging.INFO))
    assert file_handler.filter(_record(orbax_file, std_logging.WARNING))
  assert file_handler not in std_logging.getLogger().handlers  # removed and closed
  assert "our detail" in path.read_text()


def test_a_failed_first_run_removes_its_new_workdir_but_never_an_existing_one(tiny_config,
                                                                             tmp_path):
  from cfg_jax.app import train_job

  tiny_config.data.name = "mnist"  # not prepared here: fails after the lock and the log
  with pytest.raises(errors.UserError, match="not prepared"):
    train_job.train_and_evaluate(tiny_config, str(tmp_path / "new" / "run"))
  assert os.listdir(tmp_path) == []  # "new" was made for the run: gone with it
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "notes.txt").write_text("mine")
  with pytest.raises(errors.UserError, match="not prepared"):
    train_job.train_and_evaluate(tiny_config, str(existing))
  assert (existing / "notes.txt").read_text() == "mine"
