"""`train.py --config configs/dit_digits.py`: a DiT trained by cfg-jax's own loop (the CFG
loss with conditioning dropout) loads and samples like the UNet, with its null label."""

import os

import jax
import numpy as np
import pytest

import cfg_jax
from cfg_jax import errors, models
from tests.helpers import REPO, assert_one_line_error, run_cli

DIT_CONFIG = os.path.join(REPO, "configs", "dit_digits.py")
# Seconds, not quality: one block of width 16, a few steps, no classifier.
TINY = ("--config.model.hidden_size=16", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.train.num_steps=4", "--config.train.batch_size=16",
        "--config.optimizer.warmup_steps=1", "--config.optimizer.decay=constant",
        "--config.train.keep_steps=()", "--config.classifier.num_steps=0",
        "--config.sampling.num_steps=4",
        "--config.sampling.samples_per_class=1", "--config.sampling.guidance_scales=(3.0,)",
        "--config.sampling.classifier_scales=()")


def test_train_py_trains_a_dit_that_loads_and_samples(tmp_path):
  workdir = tmp_path / "dit"
  result = run_cli("train.py", "--config", DIT_CONFIG, "--workdir", workdir, *TINY)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / "samples_cfg_3.png").exists()
  model = cfg_jax.load(str(workdir))
  assert models.family(model.config.model) == "dit"
  assert (model.image_shape, model.num_classes, model.null_label) == ((8, 8, 1), 10, 10)
  assert model.latent is None and not model.learned_variance
  x = np.asarray(model.sample(jax.random.key(0), [1, 2], guidance_scale=2.0, num_steps=3,
                              timestep_spacing="trailing"))
  assert x.shape == (2, 8, 8, 1) and np.isfinite(x).all()


@pytest.mark.parametrize("field, value, message", [
    ("patch_size", 3, "model.patch_size"),
    ("num_heads", 5, "model.hidden_size"),
    ("learn_sigma", True, "model.learn_sigma"),
    ("family", "adm", "model.family"),
])
def test_bad_dit_configs_are_one_line_errors(field, value, message):
  """train.py checks the config first (tests/test_bad_inputs.py: through the command line)."""
  from cfg_jax.app import config_checks
  from configs import dit_digits

  config = dit_digits.get_config()
  config.model[field] = value
  with pytest.raises(errors.ConfigError) as info:
    config_checks.validate(config)
  assert message in str(info.value) and "\n" not in str(info.value)


def test_dit_config_takes_the_null_row_from_p_uncond():
  from configs import dit_digits

  config = dit_digits.get_config()
  net = models.dit_config(config)
  assert net.class_dropout_prob == config.diffusion.p_uncond and net.num_classes == 10
  assert models.describe(config).null_label == 10
  config.diffusion.p_uncond = 0.0  # no conditioning dropout: no null row
  assert models.describe(config).null_label is None
  config.model.family = "unet"  # its null row exists, untrained: not a null label either
  assert models.describe(config).null_label is None
  with pytest.raises(errors.ConfigError, match="family"):
    models.family({"family": "vit"})


def _vae_workdir(folder):
  """A workdir holding only a (random) VAE for 8×8×1 digits: 2× down to 4×4×4 latents."""
  from cfg_jax import checkpoints, paths
  from cfg_jax.models.dit import port, vae

  section = port.sd_vae_config()
  section.update(in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                 norm_num_groups=4, image_shape=(8, 8, 1))
  _, params = models.create(vae.AutoencoderKL, section, seed=0)
  manager = checkpoints.manager(paths.vae_checkpoints(str(folder)), max_to_keep=1)
  checkpoints.save(manager, 0, {"params": params}, {"latent": section.to_dict()})
  manager.wait_until_finished()
  return folder


def test_train_py_trains_a_latent_dit_on_a_frozen_vae(tmp_path):
  source = _vae_workdir(tmp_path / "vae_source")
  workdir = tmp_path / "latent_dit"
  latent_config = os.path.join(REPO, "configs", "dit_latent.py")
  args = ("train.py", "--config", latent_config, "--workdir", workdir, *TINY,
          "--config.data.name=digits", f"--config.latent.vae_workdir={source}")
  result = run_cli(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Encoding 1,437 images" in result.stdout + result.stderr
  model = cfg_jax.load(str(workdir))  # the VAE was copied in: the source is not needed
  assert (model.image_shape, model.output_shape) == ((4, 4, 4), (8, 8, 1))
  x = np.asarray(model.sample(jax.random.key(0), [3], guidance_scale=2.0, num_steps=3,
                              timestep_spacing="trailing"))
  assert x.shape == (1, 8, 8, 1) and np.abs(x).max() <= 1
  # A latent's round trip goes through the copied VAE.
  z = np.asarray(model.encode(np.zeros((1, 8, 8, 1), np.float32)))
  assert z.shape == (1, 4, 4, 4)
  # Resuming re-reads the same VAE config: the run continues instead of contradicting it.
  again = run_cli(*args, "--config.train.num_steps=6")
  assert again.returncode == 0, again.stderr[-3000:]
  bad = run_cli("train.py", "--config", latent_config, "--workdir", tmp_path / "w", *TINY,
                "--config.data.name=digits", f"--config.latent.vae_workdir={source}",
                "--config.classifier.num_steps=5")
  assert_one_line_error(bad, "classifier.num_steps")
  missing = run_cli("train.py", "--config", latent_config, "--workdir", tmp_path / "w", *TINY,
                    "--config.data.name=digits", f"--config.latent.vae_workdir={tmp_path}")
  assert_one_line_error(missing, "holds no VAE")
  assert not (tmp_path / "w").exists()
