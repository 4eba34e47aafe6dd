"""`convert.py guided-diffusion` then `sample.py`, as a user runs them on released
checkpoints, here on small guided-diffusion models with random (perturbed) weights."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
script_util = pytest.importorskip("guided_diffusion.script_util")

import jax  # noqa: E402  (after the skips: nothing to import without the peers)

import cfg_jax  # noqa: E402
from tests.helpers import assert_one_line_error, run_cli  # noqa: E402
from tests.test_adm import _perturb  # noqa: E402
from tests.test_guided_diffusion_reference import step_noise  # noqa: E402

MODEL_FLAGS = ("--image_size 64 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 "
               "--attention_resolutions 32 --num_head_channels 16 --class_cond True "
               "--learn_sigma True --resblock_updown True --use_scale_shift_norm True "
               "--noise_schedule cosine").split()
CLASSIFIER_FLAGS = ("--classifier_width 32 --classifier_depth 1 "
                    "--classifier_attention_resolutions 8 --classifier_pool attention "
                    "--classifier_scale 2.0").split()


def _gd_kwargs(function, argv):
  """guided-diffusion's own argparse over its defaults, as its scripts build them."""
  import argparse
  import inspect

  parser = argparse.ArgumentParser()
  script_util.add_dict_to_argparser(parser, {**script_util.model_and_diffusion_defaults(),
                                             **script_util.classifier_defaults()})
  args = vars(parser.parse_known_args(argv)[0])
  return {k: args[k] for k in inspect.signature(function).parameters}


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """(folder, the torch diffusion model, the torch classifier): a small "released" pair."""
  folder = tmp_path_factory.mktemp("released")
  model = _perturb(script_util.create_model(**_gd_kwargs(script_util.create_model,
                                                         MODEL_FLAGS)), seed=1)
  classifier = _perturb(script_util.create_classifier(
      **_gd_kwargs(script_util.create_classifier, CLASSIFIER_FLAGS)), seed=2)
  torch.save(model.state_dict(), folder / "diffusion.pt")
  torch.save(classifier.state_dict(), folder / "classifier.pt")
  return folder, model.eval(), classifier.eval()


@pytest.fixture(scope="module")
def workdir(released, tmp_path_factory):
  """The released pair converted by `convert.py`, run as a user runs it."""
  folder, _, _ = released
  workdir = tmp_path_factory.mktemp("converted") / "adm"
  result = run_cli("convert.py", "guided-diffusion", "--diffusion", folder / "diffusion.pt",
                   "--classifier", folder / "classifier.pt", "--workdir", workdir,
                   *MODEL_FLAGS, *CLASSIFIER_FLAGS)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def test_convert_then_sample_as_a_user_would(released, workdir, tmp_path):
  _, torch_model, _ = released
  model = cfg_jax.load(str(workdir))
  assert (model.image_shape, model.num_classes, model.null_label) == ((64, 64, 3), 1000, None)
  assert model.learned_variance and model.config.sampling.method == "ddpm"
  # The workdir's network is guided-diffusion's: ε and v at a few t and labels.
  x = np.random.default_rng(0).standard_normal((2, 64, 64, 3)).astype(np.float32)
  t, y = np.array([10, 700]), np.array([263, 7])
  with torch.no_grad():
    want = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(t),
                       y=torch.from_numpy(y)).numpy().transpose(0, 2, 3, 1)
  got = jax.jit(model.denoiser_fn)(x, t, y)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-4 * np.abs(want).max())
  np.testing.assert_array_equal(jax.jit(model.eps_fn)(x, t, y), got[..., :3])  # ε alone
  # sample.py takes ImageNet classes by name and the workdir's sampler defaults.
  out = tmp_path / "corgi.npz"
  result = run_cli("sample.py", "--workdir", workdir, "--out", out, "--num_samples", 2,
                   "--num_steps", 3, "--labels", "Pembroke Welsh corgi")
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out) as f:
    assert f["arr_0"].shape == (2, 64, 64, 3) and list(f["arr_1"]) == [263, 263]
  # CFG needs an unconditional pass, which a class-conditional ADM lacks: one line.
  assert_one_line_error(run_cli("sample.py", "--workdir", workdir, "--out", tmp_path / "g.npz",
                                "--num_samples", 2, "--num_steps", 3, "--guidance_scale", 3),
                        "needs null_label")


def test_classifier_guided_ddpm_equals_guided_diffusion_on_the_converted_models(
    released, workdir, monkeypatch):
  """`cfg_jax.load(workdir).sample` (its defaults: DDPM, "linspace", the learned variance, the
  classifier scale) against guided-diffusion's `p_sample_loop(cond_fn=…)` with the torch
  networks, from the same x_T and step noise: network, port, pipeline and sampler together."""
  _, torch_model, torch_classifier = released
  gaussian_diffusion = pytest.importorskip("guided_diffusion.gaussian_diffusion")
  model = cfg_jax.load(str(workdir))
  key, num_steps, scale = jax.random.key(5), 4, 2.0
  labels = np.array([263, 1])
  x_init = np.asarray(jax.random.normal(jax.random.key(6), (2, 64, 64, 3)))
  ours = model.sample(key, labels, x_init=x_init, num_steps=num_steps)
  assert model.config.sampling.classifier_scale == scale  # from --classifier_scale
  diffusion = script_util.create_gaussian_diffusion(
      steps=1000, learn_sigma=True, noise_schedule="cosine",
      timestep_respacing=str(num_steps))
  ts = cfg_jax.sampling.timesteps(1000, num_steps, "linspace", "ddpm")
  noise = iter(step_noise(key, ts, x_init.shape))
  monkeypatch.setattr(gaussian_diffusion.th, "randn_like", lambda x: next(noise))

  def cond_fn(x, t, y):
    with torch.enable_grad():
      x = x.detach().requires_grad_(True)
      log_probs = torch.log_softmax(torch_classifier(x, t), -1)
      return torch.autograd.grad(log_probs[range(len(y)), y].sum(), x)[0] * scale

  with torch.no_grad():
    theirs = diffusion.p_sample_loop(
        torch_model, (2, 3, 64, 64), noise=torch.from_numpy(x_init.transpose(0, 3, 1, 2).copy()),
        clip_denoised=True, cond_fn=cond_fn, model_kwargs={"y": torch.from_numpy(labels)},
        progress=False).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-3)


def test_bad_checkpoints_are_one_line_and_write_nothing(released, tmp_path):
  folder, _, _ = released
  convert = lambda diffusion, *flags: run_cli(
      "convert.py", "guided-diffusion", "--diffusion", diffusion, "--workdir",
      tmp_path / "out", *flags)
  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes((folder / "diffusion.pt").read_bytes()[:1000])
  assert_one_line_error(convert(truncated, *MODEL_FLAGS), "truncated.pt")
  text = tmp_path / "notes.pt"
  text.write_text("not a checkpoint")
  assert_one_line_error(convert(text, *MODEL_FLAGS), "notes.pt")
  # Flags that do not fit: the first key that differs (here the widths), in one line.
  assert_one_line_error(convert(folder / "diffusion.pt", *MODEL_FLAGS, "--num_channels", "64"),
                        "has shape")
  # A pickle that needs code to load is refused, never executed.
  evil = tmp_path / "evil.pt"
  torch.save({"weights": torch.zeros(2), "run": _Executable()}, evil)
  assert_one_line_error(convert(evil, *MODEL_FLAGS), "evil.pt")
  assert not (tmp_path / "out").exists()


class _Executable:
  """An object whose unpickling would need this test module's code."""
