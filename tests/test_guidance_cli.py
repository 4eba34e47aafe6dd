"""The guidance wiring: `command_flags.make_rule`, kept checkpoints, autoguidance's weak model,
swept generation, and the sample.py/sweep.py guidance flags on the tiny config."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfg_jax import checkpoints, distributed, guidance, paths
from cfg_jax.app import command_flags, sample_job
from tests.helpers import assert_one_line_error, run_cli as run


# -- make_rule (fast) -----------------------------------------------------------------------

def test_make_rule_builds_each_rule_from_flag_values():
  weak = lambda x, t, y: x  # noqa: E731
  rule = command_flags.make_rule("cfg", 2.0, interval="0.28,inf", weight_schedule="linear",
                            rescale=0.7)
  assert isinstance(rule, guidance.CFG) and rule.scale == 2.0
  assert rule.interval == (0.28, np.inf) and rule.weight_schedule == "linear"
  assert rule.rescale == 0.7
  assert command_flags.make_rule("cfg") == guidance.CFG(scale=3.0)  # today's sample.py default
  assert command_flags.make_rule("apg", 4.0, apg_eta=0.5, apg_momentum=-0.5,
                            apg_norm_threshold=2.0) == guidance.APG(4.0, 0.5, -0.5, 2.0)
  assert command_flags.make_rule("cfgpp", method="ddim") == guidance.CFGPlusPlus(0.6)
  rule = command_flags.make_rule("autoguidance", weak_eps_fn=weak)
  assert isinstance(rule, guidance.Autoguidance) and rule.weak_eps_fn is weak
  assert command_flags.make_rule("cfgzero", 2.0, zero_init_steps=2) == guidance.CFGZeroStar(2.0, 2)
  assert command_flags.make_rule("cfgzero") == guidance.CFGZeroStar(3.0, zero_init_steps=0)
  assert command_flags.make_rule("icg", 1.5) == guidance.IndependentCondition(1.5)
  uncond = lambda x, t, y: x  # noqa: E731
  rule = command_flags.make_rule("cfg", 2.0, uncond_eps_fn=uncond)
  assert isinstance(rule, guidance.CFG) and rule.uncond_eps_fn is uncond
  swept = command_flags.make_rule("apg", np.array([1.0, 2.0]))
  np.testing.assert_array_equal(swept.scale, [1.0, 2.0])
  # Options left unset (None) are the rule's defaults.
  assert command_flags.make_rule("cfg", 1.5, interval=None, rescale=None) == guidance.CFG(1.5)


@pytest.mark.parametrize("kind, scale, kwargs, message", [
    ("cfgg", None, {}, "Unknown --guidance 'cfgg'"),
    ("cfg", None, dict(apg_eta=1.0), "--apg_eta applies to --guidance=apg only"),
    ("apg", None, dict(rescale=0.5), "--rescale applies to --guidance=cfg only"),
    ("cfgpp", None, dict(interval="0,1"), "--interval applies to --guidance=cfg only"),
    ("cfgpp", None, dict(method="dpmpp_2m"), "--guidance=cfgpp works with --method=ddim only"),
    ("cfgpp", None, dict(method="ddpm"), "--guidance=cfgpp works with --method=ddim only"),
    ("cfgpp", 2.0, {}, "CFGPlusPlus scale must be"),
    ("cfg", None, dict(interval="1"), "--interval must be two numbers"),
    ("cfg", None, dict(interval="a,b"), "--interval must be two numbers"),
    ("cfg", None, dict(interval="1,2,3"), "--interval must be two numbers"),
    ("cfg", None, dict(interval="5,1"), "--interval needs 0 <= sigma_lo < sigma_hi"),
    ("cfg", None, dict(interval="-1,1"), "--interval needs 0 <= sigma_lo < sigma_hi"),
    ("cfg", None, dict(rescale=2.0), "CFG rescale must be"),
    ("cfg", None, dict(weight_schedule="square"), "Unknown weight_schedule"),
    ("autoguidance", None, {}, "needs a weak model; pass --weak_step N"),
    ("cfg", None, dict(weak_eps_fn=lambda x, t, y: x), "applies to --guidance=autoguidance"),
    ("cfgzero", None, dict(zero_init_steps=-1),
     "CFGZeroStar zero_init_steps must be a non-negative integer, got -1"),
    ("cfg", None, dict(zero_init_steps=1), "--zero_init_steps applies to --guidance=cfgzero only"),
    ("icg", None, dict(zero_init_steps=1), "--zero_init_steps applies to --guidance=cfgzero only"),
    ("icg", None, dict(rescale=0.5), "--rescale applies to --guidance=cfg only"),
    ("icg", None, dict(uncond_eps_fn=lambda x, t, y: x),
     "A separate unconditional network applies to --guidance=cfg only"),
    ("cfgzero", None, dict(weak_eps_fn=lambda x, t, y: x), "applies to --guidance=autoguidance"),
])
def test_make_rule_rejects_bad_combinations_in_one_line(kind, scale, kwargs, message):
  with pytest.raises(ValueError) as info:
    command_flags.make_rule(kind, scale, **kwargs)
  assert message in str(info.value) and "\n" not in str(info.value)


def test_every_guidance_kind_has_sweep_scales():
  from cfg_jax.app import sweep_job

  assert set(sweep_job.DEFAULT_SCALES) == set(command_flags.KINDS)


def test_icg_and_a_separate_network_guide_a_pipeline_without_a_null_label():
  """The rules make_rule builds for a model that has no ε(x, t, ∅): ICG draws from the
  pipeline's classes, CFG takes ε_u from the separate network."""
  import ml_collections
  from jax.tree_util import Partial

  from cfg_jax import pipeline, schedules

  config = ml_collections.ConfigDict(dict(sampling=dict(method="ddim", num_steps=5, eta=0.0)))
  eps = Partial(lambda x, t, y: 0.5 * jnp.tanh(x) + 0.1 * y[:, None])
  model = pipeline.Pipeline(eps_fn=eps, schedule=schedules.linear(1000), num_classes=3,
                            null_label=None, image_shape=(2,), config=config)
  uncond = Partial(lambda x, t, y: 0.5 * jnp.tanh(x))
  for rule in (command_flags.make_rule("icg"),
               command_flags.make_rule("cfg", uncond_eps_fn=uncond)):
    x = model.sample(jax.random.key(0), [0, 1, 2], guidance=rule)
    assert x.shape == (3, 2) and np.all(np.isfinite(x))
  with pytest.raises(ValueError, match="needs null_label") as info:
    model.sample(jax.random.key(0), [0, 1], guidance=command_flags.make_rule("cfgzero"))
  assert "\n" not in str(info.value)
  # The main job's grids and sweep.py's classifier rows: ICG in place of CFG, but γ = 1.
  assert sample_job.free_guidance(model, 3.0) == {
      "guidance": guidance.IndependentCondition(3.0, num_classes=3)}
  assert sample_job.free_guidance(model, 1.0) == {"guidance_scale": 1.0}
  with_null = dataclasses.replace(model, null_label=3, num_classes=3)
  assert sample_job.free_guidance(with_null, 0.0) == {"guidance_scale": 0.0}


# -- kept checkpoints (fast: a stand-in train step, real Orbax) -----------------------------

def test_keep_steps_are_saved_and_survive_max_to_keep(tmp_path):
  from cfg_jax.train import loop

  class Writer:
    def write(self, step, metrics):
      pass

  def train_step(state, batch, key):
    return state.replace(step=state.step + 1, params=state.params + 1.0), {"loss": 0.0}

  mesh = distributed.data_mesh(jax.devices()[:1])
  state = loop.TrainState(jnp.zeros((), jnp.int32), jnp.zeros(3), None, ())
  batches = iter(lambda: {"image": np.zeros((1, 1))}, None)
  mngr = checkpoints.manager(str(tmp_path), max_to_keep=1, keep_steps=(3,))
  loop.run_loop(state=state, train_step=train_step, batches=batches, mesh=mesh,
                key=jax.random.key(0), num_steps=6, manager=mngr, config_dict={"a": 1},
                writer=Writer(), log_every=100, checkpoint_every=2, batch_size=1,
                description="test", keep_steps=(3,))
  mngr.wait_until_finished()
  # Step 3 is no multiple of checkpoint_every: saved for keep_steps, and kept besides the
  # one latest checkpoint, also after later saves.
  assert sorted(checkpoints.manager(str(tmp_path), create=False).all_steps()) == [3, 6]
  kept = checkpoints.restore_subtree(str(tmp_path), "params", jnp.zeros(3), step=3)
  np.testing.assert_array_equal(kept, [3.0, 3.0, 3.0])
  with pytest.raises(checkpoints.CheckpointError, match=r"No checkpoint of step 4 .* keeps "
                     r"steps 3, 6.*--config.train.keep_steps='\(4,\)'"):
    checkpoints.restore_subtree(str(tmp_path), "params", jnp.zeros(3), step=4)


def test_digits_config_keeps_an_early_step():
  from configs import digits, digits_tiny

  assert tuple(digits.get_config().train.keep_steps) == (500,)
  assert tuple(digits_tiny.get_config().train.keep_steps) == ()


# -- on the tiny trained workdir (slow) -----------------------------------------------------

@pytest.fixture(scope="module")
def model(tiny_workdir):
  import cfg_jax

  return cfg_jax.load(str(tiny_workdir))


@pytest.mark.slow
def test_weak_step_loads_that_steps_ema_model_and_refuses_a_mismatch(model, tiny_workdir):
  from cfg_jax import models, pipeline
  from cfg_jax.models import unet

  weak = pipeline.load_weak(model, str(tiny_workdir), step=2)
  _, abstract = models.abstract(unet.UNet, models.model_config(model.config))
  want = checkpoints.restore_subtree(str(tiny_workdir / "checkpoints"), "ema_params",
                                     abstract, step=2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, weak.eps_fn.args[1], want)
  assert weak.classifier_fn is None and weak.image_shape == model.image_shape
  differs = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), weak.eps_fn.args[1],
      model.eps_fn.args[1]))
  assert any(differs)
  # The pipeline samples with it as Autoguidance's weak ε-function.
  x = model.sample(jax.random.key(0), [1, 2], num_steps=4,
                   guidance=guidance.Autoguidance(scale=2.0, weak_eps_fn=weak.eps_fn))
  assert x.shape == (2, 8, 8, 1) and np.all(np.isfinite(x))
  other = model.config.copy_and_resolve_references()
  other.diffusion.schedule = "linear"
  with pytest.raises(checkpoints.CheckpointError, match="diffusion.schedule: saved 'cosine', "
                     "now 'linear'.*same data set and schedule"):
    pipeline.load_weak(dataclasses.replace(model, config=other), str(tiny_workdir), step=2)


@pytest.mark.slow
def test_swept_generate_equals_separate_calls(model):
  from cfg_jax import sharded_sampling

  labels = np.arange(6) % 10
  rule = guidance.APG(scale=np.array([1.5, 3.0]), momentum=-0.5)
  kwargs = dict(batch_size=4, num_steps=4, method="dpmpp_2m", timestep_spacing="trailing")
  swept = sharded_sampling.sample_batches(jax.random.key(1), model, labels, guidance=rule,
                                          **kwargs)
  assert swept.shape == (2, 6, 8, 8, 1) and swept.dtype == np.uint8
  for g, scale in enumerate([1.5, 3.0]):
    alone = sharded_sampling.sample_batches(jax.random.key(1), model, labels,
                                            guidance=rule.replace(scale=scale), **kwargs)
    diff = np.abs(swept[g].astype(int) - alone.astype(int))
    assert diff.max() <= 1 and np.mean(diff == 0) > 0.99  # float rounding at most


@pytest.mark.slow
def test_sample_with_each_rule_and_method_writes_samples(tiny_workdir, tmp_path):
  from cfg_jax.app import sample_job

  cases = {  # in-process: the same path as sample.py, less the flag parsing
      "cfg": (dict(guidance="cfg", guidance_scale=2.0, interval="0.5,20",
                   weight_schedule="cosine", rescale=0.7), dict(method="ddim",
                                                                dynamic_threshold=0.99)),
      "cfgpp": (dict(guidance="cfgpp", guidance_scale=0.5),
                dict(method="ddim", timestep_spacing="trailing")),
      "cfgzero": (dict(guidance="cfgzero", guidance_scale=2.0, zero_init_steps=1),
                  dict(method="dpmpp_2m")),
      "icg": (dict(guidance="icg", guidance_scale=2.0), dict(method="ddpm")),
      "separate": (dict(guidance="cfg", guidance_scale=2.0, uncond_workdir=str(tiny_workdir)),
                   dict(method="ddim", guided_channels=1)),
  }
  for name, (rule, options) in cases.items():
    npz, png = sample_job.sample_to_npz(workdir=str(tiny_workdir), out=str(tmp_path / f"{name}.npz"),
                                      num_samples=3, num_steps=4, rule=rule, **options)
    with np.load(npz) as f:
      assert f["arr_0"].shape == (3, 8, 8, 1)
  flags = {  # through sample.py's flags
      "apg": ["--guidance", "apg", "--guidance_scale", 3, "--apg_momentum=-0.5", "--apg_eta",
              0.2, "--apg_norm_threshold", 5, "--method", "ddpm"],
      "auto": ["--guidance", "autoguidance", "--weak_step", 2, "--method", "dpmpp_2m",
               "--timestep_spacing", "linspace", "--dynamic_threshold", 0.995],
  }
  for name, args in flags.items():
    out = tmp_path / f"{name}.npz"
    result = run("sample.py", "--workdir", tiny_workdir, "--out", out, "--num_samples", 3,
                 "--num_steps", 4, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(out) as f:
      assert f["arr_0"].shape == (3, 8, 8, 1) and f["arr_0"].dtype == np.uint8
    assert (tmp_path / f"{name}.png").exists()


@pytest.mark.slow
def test_bad_flag_combinations_exit_2_with_one_line(tiny_workdir, tmp_path):
  out = ["--workdir", tiny_workdir, "--out", tmp_path / "x.npz", "--num_steps", 4]
  assert_one_line_error(run("sample.py", *out, "--guidance", "cfgpp", "--method", "dpmpp_2m"),
                        "--guidance=cfgpp works with --method=ddim only")
  assert_one_line_error(run("sweep.py", "--workdir", tiny_workdir, "--out_dir", tmp_path / "s",
                            "--apg_momentum=-0.5", "--interval", "3,1"),
                        "--apg_momentum applies to --guidance=apg only")
  assert_one_line_error(run("sample.py", *out, "--guidance", "apg", "--uncond_workdir",
                            tiny_workdir), "--uncond_workdir applies to --guidance=cfg only")
  assert_one_line_error(run("sample.py", *out, "--guided_channels", 2),
                        "guided_channels must be an int in 1..1")
  assert not (tmp_path / "x.npz").exists()


@pytest.mark.slow
def test_sweep_samples_a_rules_scales_in_one_call_and_names_rows(model, tiny_workdir,
                                                                 tmp_path, monkeypatch):
  from cfg_jax import sharded_sampling
  from cfg_jax.app import sample_job
  from cfg_jax.app import sweep_job
  from cfg_jax.evaluation import METRIC_NAMES, evalnet

  scored = []

  def fake_evaluate(samples, labels, net, test, train):
    scored.append(samples)
    return {name: float(np.mean(samples)) for name in METRIC_NAMES}

  monkeypatch.setattr(sweep_job, "evaluate", fake_evaluate)  # no evaluation network to train
  monkeypatch.setattr(evalnet, "load_or_train",
                      lambda *a, **k: type("Net", (), {"test_accuracy": 1.0})())
  calls = []
  real_generate = sharded_sampling.sample_batches
  monkeypatch.setattr(sharded_sampling, "sample_batches",
                      lambda *a, **k: calls.append(k) or real_generate(*a, **k))
  rows = sweep_job.run_sweep(workdir=str(tiny_workdir), guidance_scales=(1.5, 3.0),
                         classifier_scales=(1.0,), num_samples=6, num_steps=4,
                         out_dir=str(tmp_path), rule=dict(guidance="apg", apg_momentum=-0.5),
                         timestep_spacing="trailing")
  assert [(r["guidance"], r["scale"]) for r in rows] == [
      ("apg (apg_momentum=-0.5)", 1.5), ("apg (apg_momentum=-0.5)", 3.0), ("classifier", 1.0)]
  assert len(calls) == 2  # both APG scales in one generate call, then the classifier's
  np.testing.assert_array_equal(calls[0]["guidance"].scale, [1.5, 3.0])
  assert all(c["timestep_spacing"] == "trailing" for c in calls)
  want = real_generate(jax.random.key(0), model, sample_job.balanced_labels(6, 10), num_steps=4,
                       timestep_spacing="trailing", batch_size=500,
                       guidance=guidance.APG(scale=3.0, momentum=-0.5))
  assert np.abs(scored[1].astype(int) - want.astype(int)).max() <= 1
  for name in paths.SWEEP_FILES:
    assert (tmp_path / name).exists()
  assert sweep_job.rule_name({"guidance": "cfg"}) == "classifier-free"
