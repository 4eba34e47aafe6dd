"""`Pipeline.sample` and `sweep_job.run_sweep` on a hand-built pipeline: no training needed."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.tree_util import Partial

from cfg_jax import errors, guidance, pipeline, schedules


def _eps(x, t, y):
  return 0.5 * jnp.tanh(x) + 0.1 * y[:, None]


def _pipeline():
  config = ml_collections.ConfigDict(dict(
      sampling=dict(method="ddim", num_steps=5, eta=0.0)))  # t = 800 first: pure noise
  return pipeline.Pipeline(eps_fn=Partial(_eps), schedule=schedules.linear(1000),
                           num_classes=3, null_label=3, image_shape=(2,), config=config)


@pytest.mark.parametrize("options,refused", [
    (dict(guidance_scale=3.0), "guidance_scale=3.0 needs null_label"),
    (dict(guidance=guidance.CFG(3.0)), "guidance_scale=3.0 needs null_label"),
    (dict(guidance_scale=np.array([0.0, 1.0, 3.0])), r"guidance_scale=\[0.0, 1.0, 3.0\] needs"),
    (dict(guidance=guidance.CFG(np.array([1.0, 2.0]))), r"guidance_scale=\[1.0, 2.0\] needs"),
    (dict(guidance=guidance.CFG(1.0, weight_schedule="linear")), "CFG needs null_label"),
    (dict(guidance=guidance.APG(2.0)), "APG needs null_label"),
    (dict(guidance=guidance.CFGPlusPlus(0.5)), "CFGPlusPlus needs null_label"),
    (dict(guidance_scale=1.0), None),
    (dict(guidance=guidance.CFG(1.0)), None),
    (dict(), None),
    (dict(guidance=guidance.Autoguidance(2.0, Partial(_eps))), None),
])
def test_guidance_from_a_model_without_a_null_label_is_refused(options, refused):
  """A model with no unconditional ε(x, t, ∅) (null_label None): every rule that reads it is
  a one-line error, whether given as a plain scale, a rule or a sweep of scales."""
  unguidable = dataclasses.replace(_pipeline(), null_label=None)
  if refused is None:
    unguidable.sample(jax.random.key(0), [0, 1], **options)
  else:
    with pytest.raises(errors.InputError, match=refused):
      unguidable.sample(jax.random.key(0), [0, 1], **options)
  _pipeline().sample(jax.random.key(0), [0, 1], **options)  # a model with ∅ is guidable


@pytest.mark.parametrize("options,message", [
    (dict(dynamic_threshold=1.5), "dynamic_threshold must be a percentile"),
    (dict(timestep_spacing="leading", num_steps=2), "use timestep_spacing='trailing'"),
    (dict(timestep_spacing="uniform"), "Unknown timestep_spacing"),
])
def test_sweep_checks_sample_options_before_the_evaluation_network(monkeypatch, tmp_path,
                                                                   options, message):
  """A bad option must fail before `load_or_train` (which may train for minutes)."""
  from cfg_jax.app import sweep_job
  from cfg_jax.evaluation import evalnet

  def too_late(*args, **kwargs):
    raise AssertionError("the evaluation network was loaded before the options were checked")

  monkeypatch.setattr(pipeline, "load", lambda workdir: _pipeline())
  monkeypatch.setattr(evalnet, "load_or_train", too_late)
  kwargs = dict(workdir=str(tmp_path), guidance_scales=(1.0,), num_samples=4,
                out_dir=str(tmp_path / "sweep"), num_steps=5) | options
  with pytest.raises(errors.InputError, match=message):
    sweep_job.run_sweep(**kwargs)
