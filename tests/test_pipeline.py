"""`cfg_jax.load`: a trained workdir as one object that samples with everything filled in."""

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest

import cfg_jax
from cfg_jax import checkpoints, errors, guidance, sampling, schedules

pytestmark = pytest.mark.slow  # needs a workdir trained through the CLI


@pytest.fixture(scope="module")
def model(tiny_workdir):
  return cfg_jax.load(str(tiny_workdir))


def test_load_fills_in_what_sampling_needs(model, tiny_config):
  assert model.num_classes == 10 and model.null_label == 10
  assert model.image_shape == (8, 8, 1)
  assert model.config.model.base_channels == tiny_config.model.base_channels
  np.testing.assert_array_equal(model.schedule.alphas_cumprod,
                                schedules.from_config(tiny_config.diffusion).alphas_cumprod)
  assert model.classifier_fn is not None


def test_pipeline_sample_equals_the_functional_sampler(model):
  labels = np.array([0, 3, 10])
  kwargs = dict(num_steps=4, guidance_scale=2.0, classifier_scale=1.0)
  got = model.sample(jax.random.key(0), labels, **kwargs)
  want = sampling.sample(jax.random.key(0), model.eps_fn, model.schedule, labels,
                         image_shape=(8, 8, 1), null_label=10, method="ddim", eta=0.0,
                         classifier_fn=model.classifier_fn, **kwargs)
  np.testing.assert_array_equal(got, want)


def test_load_restores_the_ema_parameters_only(model, tiny_workdir):
  """The restored weights are the checkpoint's EMA copy, not its training parameters."""
  from cfg_jax.train import denoiser
  from cfg_jax.train import loop

  config = model.config
  _, params = denoiser.create_denoiser(config, 0)
  tx = loop.make_optimizer(**config.optimizer)
  full, _ = checkpoints.restore(
      checkpoints.manager(str(tiny_workdir / "checkpoints"), create=False),
      checkpoints.restore_target(loop.init_state(params, tx, with_ema=True)))
  loaded = model.eps_fn.args[1]
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, full.ema_params)
  differs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), loaded, full.params))
  assert any(differs)


def test_missing_workdir_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoints.CheckpointError, match="No checkpoint directory"):
    cfg_jax.load(str(tmp_path / "nothing"))


def test_classifier_of_another_diffusion_model_is_refused(tiny_workdir, tmp_path):
  """A classifier trained with another T (or data set) would guide with wrong gradients."""
  other = tmp_path / "other"
  shutil.copytree(tiny_workdir / "classifier", other / "classifier")
  for metadata in other.glob("classifier/*/config/metadata"):
    saved = json.loads(metadata.read_text())
    saved["diffusion"]["num_timesteps"] = 500
    metadata.write_text(json.dumps(saved))
  with pytest.raises(checkpoints.CheckpointError,
                     match="diffusion.num_timesteps: saved 500, now 1000"):
    cfg_jax.load(str(tiny_workdir), classifier_workdir=str(other))


def test_out_of_range_labels_are_refused_before_sampling(model):
  with pytest.raises(errors.InputError, match="label 11 is out of range"):
    model.sample(jax.random.key(0), np.array([1, 11]), num_steps=2)
  with pytest.raises(errors.InputError, match="label -1 is out of range"):
    model.sample(jax.random.key(0), np.array([-1]), num_steps=2)


def test_guidance_from_a_model_without_a_null_label_is_refused(model):
  """Through the public path; tests/test_pipeline_options.py covers every kind of rule."""
  unguidable = dataclasses.replace(model, null_label=None)
  kw = dict(num_steps=4, timestep_spacing="trailing")
  with pytest.raises(errors.InputError, match=r"guidance_scale=\[1.0, 3.0\] needs null_label"):
    unguidable.sample(jax.random.key(0), [1, 2], guidance=guidance.CFG(np.array([1.0, 3.0])), **kw)
  unguidable.sample(jax.random.key(0), [1, 2], guidance_scale=1.0, **kw)
  model.sample(jax.random.key(0), [1, 2], guidance=guidance.CFG(3.0), **kw)
