"""`convert.py dit` on a diffusers DiT pipeline folder (written by `save_pretrained`, random
perturbed weights), then CFG sampling through `cfg_jax.load` against diffusers' `DiTPipeline`
loop, with every channel guided (diffusers) or the first 3 (DiT's `forward_with_cfg`)."""

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import cfg_jax  # noqa: E402
from cfg_jax import errors, models  # noqa: E402
from tests.helpers import assert_one_line_error, run_cli  # noqa: E402
from tests.test_dit import OriginalDiT, original_pos_embed, perturb, tie_embedders  # noqa: E402

# DiTPipeline's null class is 1000: the tiny DiT keeps ImageNet's label table.
TINY_DIT = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
                num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
TINY_VAE = dict(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                norm_num_groups=8, latent_channels=4, sample_size=16)
LABELS = [3, 999, 0]
SCALE, STEPS = 4.0, 8


@pytest.fixture(scope="module")
def torch_pipeline(tmp_path_factory):
  """(folder, DiTPipeline): a tiny DiT pipeline saved as the Hub's facebook/DiT-XL-2-256 is."""
  torch.manual_seed(0)
  transformer = tie_embedders(perturb(diffusers.DiTTransformer2DModel(**TINY_DIT), seed=3))
  vae = perturb(diffusers.AutoencoderKL(**TINY_VAE), seed=4)
  # facebook/DiT-XL-2-256's scheduler_config.json: linear β, no clipping.
  scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)
  pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
  folder = tmp_path_factory.mktemp("hub") / "DiT-tiny"
  pipe.save_pretrained(folder)
  return folder, pipe


@pytest.fixture(scope="module")
def workdir(torch_pipeline, tmp_path_factory):
  folder, _ = torch_pipeline
  workdir = tmp_path_factory.mktemp("converted") / "dit"
  result = run_cli("convert.py", "dit", "--pretrained", folder, "--workdir", workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def initial_latents(seed, batch):
  """DiTPipeline's x_T for `torch.Generator().manual_seed(seed)` (NCHW), and ours (NHWC)."""
  x = torch.randn((batch, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
  return x, x.permute(0, 2, 3, 1).numpy()


def reference_loop(pipe, latents, labels, scale, steps, guided_channels=4):
  """DiTPipeline.__call__'s CFG loop, with DiT's `forward_with_cfg` channel split: only the
  first `guided_channels` ε channels are guided, the rest keep the conditional pass (4: all,
  as diffusers). Returns the final latents (NHWC)."""
  scheduler = pipe.scheduler
  scheduler.set_timesteps(steps)
  y = torch.tensor(list(labels) + [1000] * len(labels))
  x = latents
  with torch.no_grad():
    for t in scheduler.timesteps:
      out = pipe.transformer(torch.cat([x, x]), timestep=t.expand(2 * len(labels)),
                             class_labels=y).sample
      eps = out[:, :4]
      cond, uncond = eps.chunk(2)
      guided = uncond + scale * (cond - uncond)
      eps = torch.cat([guided[:, :guided_channels], cond[:, guided_channels:]], dim=1)
      x = scheduler.step(eps, t, x).prev_sample
  return x.permute(0, 2, 3, 1).numpy()


def latent_atol(reference):
  """The absolute tolerance of 50 float32 DDIM steps through a perturbed DiT: 1e-4, or 1e-5
  of the latents' largest magnitude (perturbed weights make some ~200). Float32 rounding
  grows with that scale, and its order differs from CPU to CPU (2.2e-6 of it seen on an AMD
  EPYC), while a wrong convention is off by O(1)."""
  return max(1e-4, 1e-5 * float(np.abs(reference).max()))


def test_converted_folder_describes_a_latent_dit(workdir):
  model = cfg_jax.load(str(workdir))
  assert model.image_shape == (8, 8, 4) and model.output_shape == (16, 16, 3)
  assert (model.num_classes, model.null_label, model.learned_variance) == (1000, 1000, True)
  assert model.class_names[0].startswith("tench")
  section = model.config.sampling
  assert (section.method, section.num_steps, section.timestep_spacing) == ("ddim", 50, "leading")
  assert section.clip_denoised is False


def test_cfg_ddim_equals_dit_pipeline(torch_pipeline, workdir):
  _, pipe = torch_pipeline
  x_torch, x_ours = initial_latents(seed=7, batch=len(LABELS))
  with torch.no_grad():
    images = pipe(class_labels=LABELS, guidance_scale=SCALE, num_inference_steps=STEPS,
                  generator=torch.Generator().manual_seed(7), output_type="np").images
  model = cfg_jax.load(str(workdir))
  ours = np.asarray(model.sample(jax.random.key(0), LABELS, x_init=x_ours, guidance_scale=SCALE,
                                 num_steps=STEPS))
  assert ours.shape == (3, 16, 16, 3)
  assert images.std() > 0.05  # not a constant image: the perturbation reached the output
  np.testing.assert_allclose((ours + 1) / 2, images, atol=2e-4)
  # The latents before decoding are the reference loop's, and decode maps them to the images.
  latents = np.asarray(model.sample(jax.random.key(0), LABELS, x_init=x_ours, guidance_scale=SCALE,
                                    num_steps=STEPS, decode=False))
  reference = reference_loop(pipe, x_torch, LABELS, SCALE, STEPS)
  assert np.abs(latents - x_ours).mean() > 0.1  # the sampler moved the latents
  np.testing.assert_allclose(latents, reference, atol=latent_atol(reference), rtol=1e-4)
  np.testing.assert_allclose(np.asarray(model.decode(latents)), ours, atol=1e-5)


def test_guiding_three_channels_equals_forward_with_cfg(torch_pipeline, workdir):
  _, pipe = torch_pipeline
  x_torch, x_ours = initial_latents(seed=8, batch=len(LABELS))
  model = cfg_jax.load(str(workdir))
  ours = np.asarray(model.sample(jax.random.key(0), LABELS, x_init=x_ours, guidance_scale=SCALE,
                                 num_steps=STEPS, decode=False, guided_channels=3))
  reference = reference_loop(pipe, x_torch, LABELS, SCALE, STEPS, 3)
  np.testing.assert_allclose(ours, reference, atol=latent_atol(reference), rtol=1e-4)
  all_channels = np.asarray(model.sample(jax.random.key(0), LABELS, x_init=x_ours, guidance_scale=SCALE,
                                         num_steps=STEPS, decode=False))
  assert np.abs(ours - all_channels)[..., 3].mean() > 1e-3  # the option changes channel 3


def test_encode_is_the_scaled_posterior_mean(torch_pipeline, workdir):
  _, pipe = torch_pipeline
  images = np.random.default_rng(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with torch.no_grad():
    mean = pipe.vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2)).latent_dist.mean
  expected = mean.permute(0, 2, 3, 1).numpy() * pipe.vae.config.scaling_factor
  np.testing.assert_allclose(np.asarray(cfg_jax.load(str(workdir)).encode(images)), expected,
                             atol=5e-5, rtol=1e-5)


def test_sample_py_writes_decoded_images(workdir, tmp_path):
  out = tmp_path / "dit.npz"
  result = run_cli("sample.py", "--workdir", workdir, "--out", out, "--num_samples", "2",
                   "--labels", "1,2", "--num_steps", "3", "--timestep_spacing", "trailing",
                   "--guidance_scale", "1.5")
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out) as saved:
    assert saved["arr_0"].shape == (2, 16, 16, 3) and saved["arr_0"].dtype == np.uint8
    assert saved["arr_0"].std() > 5


def test_original_checkpoint_with_a_vae_folder(torch_pipeline, tmp_path):
  """`--checkpoint` (DiT's own key layout, its `args` beside the weights) and `--vae`."""
  import argparse

  folder, _ = torch_pipeline
  torch.manual_seed(0)
  original = perturb(OriginalDiT(16, 8, 4, 384, 12, 6, 1000), seed=5)
  with torch.no_grad():  # a fixed buffer in DiT, not a weight
    original.pos_embed.copy_(torch.from_numpy(original_pos_embed(384, 2)))
  state = original.state_dict()
  path = tmp_path / "DiT-S-8-32x32.pt"
  torch.save({"model": state, "ema": state, "args": argparse.Namespace(model="DiT-S/8")}, path)
  workdir = tmp_path / "dit_original"
  result = run_cli("convert.py", "dit", "--checkpoint", path, "--vae", folder,
                   "--workdir", workdir, "--guided_channels", "3")
  assert result.returncode == 0, result.stderr[-3000:]
  model = cfg_jax.load(str(workdir))
  assert model.config.sampling.guided_channels == 3 and model.config.sampling.method == "ddpm"
  x = np.random.default_rng(1).normal(size=(2, 16, 16, 4)).astype(np.float32)
  t, y = np.array([10, 900]), np.array([5, 1000])
  with torch.no_grad():
    ref = original(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
                   torch.from_numpy(y)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(model.denoiser_fn(x, t, y)), ref, atol=2e-4, rtol=1e-4)
  # The same name cannot tell the model at another size: the user is asked for it.
  renamed = tmp_path / "mine.pt"
  path.rename(renamed)
  assert_one_line_error(run_cli("convert.py", "dit", "--checkpoint", renamed, "--vae", folder,
                                "--workdir", tmp_path / "other"), "--model DiT-XL/2")


def test_bad_folders_are_one_line_errors(torch_pipeline, tmp_path):
  folder, _ = torch_pipeline
  convert = lambda *args: run_cli("convert.py", "dit", *args)  # noqa: E731
  assert_one_line_error(convert("--pretrained", tmp_path / "nothing", "--workdir",
                                tmp_path / "w1"), "model_index.json")
  assert_one_line_error(convert("--checkpoint", tmp_path / "x.pt", "--workdir", tmp_path / "w2"),
                        "--vae")
  broken = tmp_path / "broken"
  broken.mkdir()
  for name in ("model_index.json",):
    (broken / name).write_text((folder / name).read_text())
  for sub in ("transformer", "vae", "scheduler"):
    (broken / sub).mkdir()
    for item in (folder / sub).iterdir():
      (broken / sub / item.name).write_bytes(item.read_bytes())
  scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
  (broken / "scheduler" / "scheduler_config.json").write_text(
      json.dumps({**scheduler, "prediction_type": "v_prediction"}))
  assert_one_line_error(convert("--pretrained", broken, "--workdir", tmp_path / "w3"),
                        "prediction_type")
  assert not (tmp_path / "w3").exists()  # nothing written for a refused conversion


def test_pixel_models_have_no_decode():
  info = models.ModelInfo((8, 8, 1), 10, 10)
  assert info.null_label == 10
  pipeline = cfg_jax.pipeline.Pipeline(eps_fn=None, schedule=None, num_classes=10, null_label=10,
                                       image_shape=(8, 8, 1), config=None)
  with pytest.raises(errors.InputError, match="pixel space"):
    pipeline.decode(np.zeros((1, 8, 8, 1)))
