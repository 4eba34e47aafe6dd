"""Guidance distillation (Meng et al. 2023, stage 1): the loss at its optimum on Gaussian data,
the student's zero-initialised w-embedding, one-pass sampling against the teacher's two-pass
CFG, and `train.py --config configs/digits_distill.py` end to end."""

import os
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

import cfg_jax
from cfg_jax import checkpoints, errors, guidance, models, pipeline, sampling, schedules
from cfg_jax.app import command_flags, config_checks, sample_job
from cfg_jax.train import distill
from configs import digits, digits_distill, digits_tiny
from tests import reference_samplers as ref
from tests.gaussian_oracle import GaussianClasses
from tests.helpers import REPO, assert_one_line_error, run_cli

SCHEDULE = schedules.linear(1000)
MEANS = np.array([[0.6, -0.4], [-0.5, 0.5], [0.1, 0.7]])
ORACLE = GaussianClasses(SCHEDULE, MEANS, std=0.3)
NULL = ORACLE.num_classes
LABELS = np.array([0, 1, 2, 3, 1])  # one null label among them
X_T = np.random.default_rng(0).standard_normal((len(LABELS), 2)).astype(np.float32)


def guided_oracle(x_t, t, y, w):
  """The exact guided ε̂ = ε_u + w·(ε_c − ε_u) of the Gaussian data: the perfect student."""
  eps_c, eps_u = ORACLE.eps(x_t, t, y), ORACLE.eps_uncond(x_t, t)
  return eps_u + w[:, None] * (eps_c - eps_u)


# -- the loss ---------------------------------------------------------------------------------

def _loss(student, **options):
  labels = np.random.default_rng(1).integers(0, NULL, 4096)
  x0 = ORACLE.sample_data(np.random.default_rng(2), labels).astype(np.float32)
  return distill.distillation_loss(
      None, lambda params, x_t, t, y, w: student(x_t, t, y, w), ORACLE.eps, SCHEDULE,
      jnp.asarray(x0), jnp.asarray(labels), jax.random.key(3), guidance_scale_range=(0.0, 4.0),
      p_uncond=0.1, null_label=NULL, **options)


def test_the_exact_guided_student_has_zero_loss_and_a_wrong_w_costs_its_square():
  exact, aux = _loss(guided_oracle)
  assert float(exact) < 1e-10  # the target is a function of (x_t, t, y, w): no noise floor
  w = np.asarray(aux["w"])
  assert 0 <= w.min() and w.max() <= 4 and abs(w.mean() - 2) < 0.1  # U[0, 4] per example
  dropped = np.asarray(aux["dropped"])
  assert 0.07 < dropped.mean() < 0.13

  # A student at w + 1 misses by ‖ε_c − ε_u‖² per example (0 where y = ∅: ε̂ = ε_u at any w).
  shifted, shifted_aux = _loss(lambda x_t, t, y, w: guided_oracle(x_t, t, y, w + 1.0))
  gap = np.asarray(shifted_aux["per_example_loss"])
  assert float(shifted) > 1e-3 and np.all(gap[dropped] == 0) and np.all(gap[~dropped] > 0)
  _, half_aux = _loss(lambda x_t, t, y, w: guided_oracle(x_t, t, y, w + 0.5))
  np.testing.assert_allclose(half_aux["per_example_loss"], gap / 4, rtol=1e-4, atol=1e-9)
  # The teacher's conditional model (the fresh student) misses by (w − 1)² of that.
  _, cond_aux = _loss(lambda x_t, t, y, w: ORACLE.eps(x_t, t, y))
  np.testing.assert_allclose(cond_aux["per_example_loss"], (w - 1) ** 2 * gap, rtol=1e-3,
                             atol=1e-9)


def test_min_snr_weights_each_example_of_the_distillation_loss_by_min_snr_over_snr():
  student = lambda x_t, t, y, w: guided_oracle(x_t, t, y, w + 1.0)  # noqa: E731
  plain, aux = _loss(student)
  weighted, weighted_aux = _loss(student, min_snr_gamma=5.0)
  abar = np.asarray(SCHEDULE.alphas_cumprod, np.float64)[np.asarray(aux["t"])]
  snr = abar / (1 - abar)
  np.testing.assert_allclose(weighted_aux["per_example_loss"],
                             aux["per_example_loss"] * np.minimum(snr, 5.0) / snr, rtol=3e-4,
                             atol=1e-9)
  assert float(weighted) < float(plain) and (snr > 5).any() and (snr < 5).any()
  assert float(_loss(guided_oracle, min_snr_gamma=5.0)[0]) < 1e-10  # the optimum stays at 0


# -- the student network ----------------------------------------------------------------------

def _tiny_student_config():
  config = digits_distill.get_config()
  config.model.update(digits_tiny.get_config().model)  # the tiny teacher's UNet, with w
  return config


def test_the_fresh_student_is_the_teachers_conditional_model_at_every_w():
  config = _tiny_student_config()
  # Random weights: a fresh UNet would output 0 (its output layers start at zero).
  teacher_graphdef, shapes = models.abstract(*models.denoiser(digits_tiny.get_config()))
  rng = np.random.default_rng(0)
  teacher_params = jax.tree_util.tree_map(
      lambda p: (0.2 * rng.standard_normal(p.shape)).astype(np.float32), shapes)
  graphdef, params = distill.init_student(config, teacher_params, seed=1)
  assert set(params) - set(teacher_params) == {"guidance_embed"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, {k: params[k] for k in teacher_params},
                         teacher_params)

  apply = jax.jit(models.apply, static_argnums=0)
  x = jnp.asarray(rng.standard_normal((4, 8, 8, 1)), jnp.float32)
  t, y = jnp.array([0, 250, 600, 999]), jnp.array([0, 3, 9, 10])  # 10 is ∅
  teacher = apply(teacher_graphdef, teacher_params, x, t, y)
  assert np.abs(teacher).max() > 0.1
  for w in (0.0, 1.0, 2.5, 4.0):
    student = apply(graphdef, params, x, t, y, jnp.full((4,), w))
    np.testing.assert_allclose(student, teacher, rtol=0, atol=1e-6)

  # Once its output layer has learned anything, w changes ε: the embedding is wired in.
  kernel = params["guidance_embed"]["fc2"]["kernel"]
  params["guidance_embed"]["fc2"]["kernel"] = jnp.asarray(rng.standard_normal(kernel.shape),
                                                          jnp.float32)
  at = lambda w: np.asarray(apply(graphdef, params, x, t, y, jnp.full((4,), w)))
  assert np.abs(at(0.0) - at(4.0)).max() > 1e-3
  with pytest.raises(TypeError, match="takes the guidance scale w"):
    models.apply(graphdef, params, x, t, y)
  with pytest.raises(TypeError, match="one without takes none"):
    models.apply(teacher_graphdef, teacher_params, x, t, y, jnp.ones(4))


def test_the_default_unet_has_no_w_embedding():
  _, params = models.abstract(*models.denoiser(digits.get_config()))
  assert "guidance_embed" not in params
  assert not models.describe(digits.get_config()).guidance_distilled
  assert models.describe(digits_distill.get_config()).guidance_distilled


# -- sampling ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["ddim", "ddpm", "dpmpp_2m"])
def test_one_student_pass_equals_the_teachers_two_pass_cfg(method):
  batches = []

  def student(x_t, t, y, w):
    batches.append(x_t.shape[0])  # at trace time: the batch of each pass
    return guided_oracle(x_t, t, y, w)

  kw = dict(x_init=X_T, num_steps=10, method=method, null_label=NULL, num_classes=NULL,
            clip_denoised=False, classifier_fn=ORACLE.logits, classifier_scale=1.0)
  got = sampling.sample(jax.random.key(0), student, SCHEDULE, LABELS,
                        guidance=guidance.Distilled(2.5), **kw)
  want = sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE, LABELS, guidance_scale=2.5,
                         **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert batches == [len(LABELS)]  # one pass of B per step, not the 2B of CFG


def test_w_0_is_the_student_at_the_null_label_like_two_pass_cfg_at_0():
  def student(x_t, t, y, w):  # a student of Meng et al.'s γ in [1, 5], wrong outside it
    return guided_oracle(x_t, t, y, jnp.clip(w, 1.0, 5.0))

  kw = dict(x_init=X_T, num_steps=10, null_label=NULL, num_classes=NULL, clip_denoised=False,
            classifier_fn=ORACLE.logits, classifier_scale=1.0)  # its gradient at the labels
  scales = jnp.array([0.0, 1.0, 3.0])
  got = sampling.sample(jax.random.key(0), student, SCHEDULE, LABELS,
                        guidance=guidance.Distilled(scales), **kw)
  want = sampling.sample(jax.random.key(0), ORACLE.eps, SCHEDULE, LABELS, guidance_scale=scales,
                         **kw)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_sweep_of_w_equals_separate_calls_and_a_new_w_does_not_recompile(monkeypatch):
  ref.install_trace_counter(monkeypatch, n=2)  # the sweep's program and one for any scalar w
  kw = dict(x_init=X_T, num_steps=5, null_label=NULL, num_classes=NULL, eta=0.5)
  scales = [0.0, 1.0, 3.0]
  swept = sampling.sample(jax.random.key(2), guided_oracle, SCHEDULE, LABELS,
                          guidance=guidance.Distilled(jnp.array(scales)), **kw)
  assert swept.shape == (3, len(LABELS), 2)
  for i, w in enumerate(scales):
    one = sampling.sample(jax.random.key(2), guided_oracle, SCHEDULE, LABELS,
                          guidance=guidance.Distilled(w), **kw)
    np.testing.assert_allclose(swept[i], one, rtol=1e-5, atol=1e-5)


def _pipeline(config):
  student = Partial(lambda x_t, t, y, w: 0.5 * jnp.tanh(x_t) * w[:, None, None, None])
  teacher = Partial(lambda x_t, t, y: 0.5 * jnp.tanh(x_t))
  network = student if config.model.get("guidance_embedding", False) else teacher
  return pipeline.Pipeline.from_config(config, network)


def test_a_student_pipeline_samples_with_guidance_scale_as_its_input():
  model = _pipeline(digits_distill.get_config())
  assert model.guidance_distilled
  kw = dict(num_steps=4, timestep_spacing="trailing")
  got = model.sample(jax.random.key(0), [1, 2], guidance_scale=2.0, **kw)
  want = model.sample(jax.random.key(0), [1, 2], guidance=guidance.Distilled(2.0), **kw)
  np.testing.assert_array_equal(got, want)
  assert not np.allclose(got, model.sample(jax.random.key(0), [1, 2], guidance_scale=4.0, **kw))


def test_a_scale_outside_the_students_range_warns_and_one_inside_does_not():
  config = digits_distill.get_config()
  config.distill.guidance_scale_range = (1.0, 5.0)
  model = _pipeline(config)
  kw = dict(num_steps=2, timestep_spacing="trailing")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    model.sample(jax.random.key(0), [1, 2], guidance_scale=jnp.array([1.0, 5.0]), **kw)
  with pytest.warns(UserWarning, match=r"guidance scale 0.5 is outside \[1, 5\], the range"):
    model.sample(jax.random.key(0), [1, 2], guidance_scale=jnp.array([3.0, 0.5]), **kw)


@pytest.mark.parametrize("config,options,message", [
    (digits_distill.get_config(), dict(guidance=guidance.CFG(2.0)),
     "guidance-distilled student: it takes the guidance scale as an input"),
    (digits_distill.get_config(), dict(guidance=guidance.APG(2.0)), "APG needs its teacher's"),
    (digits_distill.get_config(), dict(guidance_scale=2.0, guided_channels=1),
     "guided_channels does not apply to guidance.Distilled"),
    (digits.get_config(), dict(guidance=guidance.Distilled(2.0)),
     "guidance.Distilled needs a guidance-distilled student"),
])
def test_rules_a_model_cannot_run_are_one_line_errors(config, options, message):
  with pytest.raises(errors.InputError, match=message) as info:
    _pipeline(config).sample(jax.random.key(0), [1, 2], num_steps=4, timestep_spacing="trailing",
                             **options)
  assert "\n" not in str(info.value)


def test_sample_py_flags_give_a_student_distilled_cfg_alone():
  model = _pipeline(digits_distill.get_config())
  rule = sample_job.guidance_rule(model, "runs/student", "cfg", np.array([0.0, 3.0]))
  assert isinstance(rule, guidance.Distilled)
  np.testing.assert_array_equal(rule.scale, [0.0, 3.0])
  assert sample_job.guidance_rule(model, "runs/student").scale == 3.0  # cfg's default γ
  for kind, options, message in [
      ("apg", {}, "--guidance=apg cannot guide"), ("cfg", dict(rescale=0.5), "--rescale cannot"),
      ("autoguidance", dict(weak_step=2), "--weak_step does not apply"),
      ("cfg", dict(uncond_workdir="runs/u"), "--uncond_workdir does not apply")]:
    with pytest.raises(errors.InputError, match=message):
      sample_job.guidance_rule(model, "runs/student", kind, 2.0, **options)
  assert isinstance(command_flags.make_rule("cfg", 2.0), guidance.CFG)  # others: unchanged


# -- configs and the teacher ------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("distill.teacher_workdir", "", "distill.teacher_workdir is empty"),
    ("distill.guidance_scale_range", (4.0, 0.0), "must be \\(low, high\\) with low < high"),
    ("distill.teacher_step", -1, "distill.teacher_step must be >= 0"),
    ("model.guidance_embedding", False, "must be a UNet with guidance_embedding=True"),
])
def test_bad_distill_configs_are_config_errors(field, value, message):
  config = digits_distill.get_config()
  config.distill.teacher_workdir = "runs/digits"
  section, name = field.split(".")
  config[section][name] = value
  with pytest.raises(errors.ConfigError, match=message):
    config_checks.validate(config)


def test_a_w_embedding_without_a_teacher_is_a_config_error():
  config = digits.get_config()
  config.model.guidance_embedding = True
  with pytest.raises(errors.ConfigError, match="guidance_embedding is True without a distill"):
    config_checks.validate(config)


@pytest.mark.parametrize("change,message", [
    (lambda c: c["diffusion"].update(num_timesteps=500), "diffusion.num_timesteps: saved 500"),
    (lambda c: c["model"].update(base_channels=16), "model.base_channels: saved 16, now 32"),
    (lambda c: c["model"].update(guidance_embedding=True), "is itself a guidance-distilled"),
    (lambda c: c["diffusion"].update(p_uncond=0.0), "without conditioning dropout"),
])
def test_a_teacher_that_cannot_teach_the_student_is_a_one_line_error(change, message):
  teacher = digits.get_config().to_dict()
  change(teacher)
  with pytest.raises(checkpoints.CheckpointError, match=message) as info:
    distill.check_teacher(teacher, digits_distill.get_config().to_dict(), "runs/t/checkpoints")
  assert "\n" not in str(info.value)
  distill.check_teacher(digits.get_config().to_dict(), digits_distill.get_config().to_dict(),
                        "runs/t/checkpoints")  # the default teacher teaches the default student
  student = digits_distill.get_config()
  student.model.dropout = 0.0  # a training setting: the student may choose its own
  distill.check_teacher(digits.get_config().to_dict(), student.to_dict(), "runs/t/checkpoints")


# -- end to end -------------------------------------------------------------------------------

DISTILL_CONFIG = os.path.join(REPO, "configs", "digits_distill.py")
# The tiny teacher's UNet (tests/conftest.py's tiny_workdir), a few steps of it.
TINY = ("--config.model.base_channels=8", "--config.model.num_groups=4",
        "--config.train.num_steps=4", "--config.train.batch_size=16",
        "--config.train.log_every=2", "--config.train.checkpoint_every=2",
        "--config.optimizer.warmup_steps=1", "--config.optimizer.decay=constant",
        "--config.sampling.num_steps=4", "--config.sampling.samples_per_class=1",
        "--config.sampling.guidance_scales=(3.0,)")


@pytest.mark.slow  # trains a tiny teacher and its student through the CLI
def test_train_py_distils_a_student_that_loads_samples_and_resumes(tiny_workdir, tmp_path):
  student_dir = tmp_path / "student"
  train = lambda *extra: run_cli("train.py", "--config", DISTILL_CONFIG, "--workdir",
                                 student_dir, f"--config.distill.teacher_workdir={tiny_workdir}",
                                 *TINY, *extra)
  result = train()
  assert result.returncode == 0, result.stderr[-3000:]
  assert (student_dir / "samples_cfg_3.png").exists()

  model = cfg_jax.load(str(student_dir), classifier_workdir=str(tiny_workdir))
  assert model.guidance_distilled and model.config.distill.teacher_step == 4
  assert np.any(np.asarray(model.eps_fn.args[1]["guidance_embed"]["fc2"]["kernel"]) != 0)
  labels, kw = np.arange(10), dict(num_steps=4, timestep_spacing="trailing")
  one = model.sample(jax.random.key(0), labels, guidance_scale=2.0, **kw)
  swept = model.sample(jax.random.key(0), labels, guidance_scale=jnp.array([0.0, 2.0]), **kw)
  assert one.shape == (10, 8, 8, 1) and swept.shape == (2, 10, 8, 8, 1)
  np.testing.assert_allclose(swept[1], one, rtol=1e-5, atol=1e-5)
  guided = model.sample(jax.random.key(0), labels, guidance_scale=2.0, classifier_scale=1.0, **kw)
  assert np.isfinite(guided).all() and not np.allclose(guided, one)

  resumed = train("--config.train.num_steps=6", "--config.sampling.guidance_scales=()")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resuming distillation from step 4" in resumed.stdout + resumed.stderr
  assert checkpoints.latest_step(str(student_dir / "checkpoints")) == 6
  assert_one_line_error(train("--config.train.num_steps=6",
                              "--config.distill.guidance_scale_range=(0.0,4.0)"),
                        "contradicts the checkpoint")

  out = tmp_path / "s.npz"
  sampled = run_cli("sample.py", "--workdir", student_dir, "--out", out, "--num_samples", "10",
                    "--num_steps", "4", "--timestep_spacing", "trailing",
                    "--guidance_scale", "2")
  assert sampled.returncode == 0, sampled.stderr[-3000:]
  assert out.exists()


@pytest.mark.slow  # the shared tiny teacher
def test_a_teacher_of_another_schedule_is_refused_before_any_file(tiny_workdir, tmp_path):
  result = run_cli("train.py", "--config", DISTILL_CONFIG, "--workdir", tmp_path / "s",
                   f"--config.distill.teacher_workdir={tiny_workdir}", *TINY,
                   "--config.diffusion.schedule=linear")
  assert_one_line_error(result, "diffusion.schedule: saved 'cosine', now 'linear'")
  assert not (tmp_path / "s").exists()
