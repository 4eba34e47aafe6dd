"""`convert.py`'s job: a released PyTorch checkpoint → a workdir that `cfg_jax.load`,
`sample.py` and `sweep.py` read like a trained one.

    python convert.py guided-diffusion --diffusion 64x64_diffusion.pt \\
        --classifier 64x64_classifier.pt --workdir runs/adm64 --preset 64x64
    python convert.py dit --pretrained DiT-XL-2-256 --workdir runs/dit256
    python convert.py dit --checkpoint DiT-XL-2-256x256.pt --vae sd-vae-ft-ema \\
        --workdir runs/dit256

guided-diffusion's model and classifier flags follow, with its names and `--flag value`
form (`--class_cond True`), over the preset's (or guided-diffusion's defaults without one),
so its README's MODEL_FLAGS and CLASSIFIER_FLAGS paste in unchanged. Every file is checked
(keys, shapes, that it is a plain state dict) before anything is written; a checkpoint that
does not fit the flags is one line naming the first key that differs and the preset that
fits it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from typing import Optional, Sequence

from cfg_jax import checkpoints, errors, paths
from cfg_jax.models.adm import port, presets
from cfg_jax.models.dit import port as dit_port

class _Parser(argparse.ArgumentParser):
  def __init__(self, *args, **kwargs):  # no prefix matching: the sources' flags pass through
    super().__init__(*args, allow_abbrev=False, **kwargs)

  def error(self, message):  # one line and exit status 2, as every other bad input
    raise errors.InputError(f"{message} (see python convert.py --help).")


def parse_args(argv: Sequence[str]):
  """(our options, the rest: guided-diffusion's flags) of `convert.py FORMAT ...`."""
  parser = _Parser(
      prog="convert.py", description="Converts released PyTorch checkpoints to a workdir.")
  formats = parser.add_subparsers(dest="format", required=True, parser_class=_Parser)
  adm = formats.add_parser("guided-diffusion", help="OpenAI's ADM models and classifiers")
  adm.add_argument("--diffusion", required=True, help="the diffusion model's .pt or "
                   ".safetensors file")
  adm.add_argument("--classifier", help="the noisy classifier's .pt or .safetensors file")
  adm.add_argument("--preset", choices=sorted(presets.PRESETS),
                   help="a released model's flags (guided-diffusion's README)")
  dit = formats.add_parser("dit", help="DiT on the Stable Diffusion VAE")
  source = dit.add_mutually_exclusive_group(required=True)
  source.add_argument("--pretrained", help="a diffusers DiTPipeline folder (model_index.json, "
                      "transformer/, vae/, scheduler/), e.g. facebook/DiT-XL-2-256")
  source.add_argument("--checkpoint", help="a checkpoint of DiT's own code, e.g. "
                      "DiT-XL-2-256x256.pt (needs --vae)")
  dit.add_argument("--vae", help="with --checkpoint: a diffusers AutoencoderKL folder (or a "
                   "pipeline folder holding vae/), e.g. stabilityai/sd-vae-ft-ema")
  dit.add_argument("--model", help="with --checkpoint: DiT-{S,B,L,XL}/{2,4,8} (default: read "
                   "from a file name like DiT-XL-2-256x256.pt)")
  dit.add_argument("--image_size", type=int, help="with --checkpoint: 256 or 512 (default: "
                   "from the file name)")
  dit.add_argument("--guided_channels", type=int, help="guide only the first K latent "
                   "channels by default (DiT's own sampler: 3); default all (diffusers')")
  for sub in (adm, dit):
    sub.add_argument("--workdir", required=True, help="the folder to write")
    sub.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                     help="compute dtype (use_fp16 of the sources, on accelerators)")
  options, rest = parser.parse_known_args(list(argv))
  if options.format == "dit" and rest:
    raise errors.InputError(f"unrecognized arguments: {' '.join(rest)} (see python convert.py "
                            "dit --help).")
  return options, rest


def convert(options, flag_argv: Sequence[str] = ()) -> dict:
  """Runs the conversion `parse_args` read; returns the workdir's config."""
  if options.format == "dit":
    return convert_dit(pretrained=options.pretrained, checkpoint=options.checkpoint,
                       vae_dir=options.vae, model=options.model, image_size=options.image_size,
                       guided_channels=options.guided_channels, workdir=options.workdir,
                       dtype=options.dtype)
  return convert_guided_diffusion(diffusion=options.diffusion, classifier=options.classifier,
                                  workdir=options.workdir, preset=options.preset,
                                  dtype=options.dtype, flag_argv=flag_argv)


def convert_guided_diffusion(*, diffusion: str, workdir: str, classifier: Optional[str] = None,
                             preset: Optional[str] = None, dtype: str = "float32",
                             flag_argv: Sequence[str] = ()) -> dict:
  """Converts guided-diffusion checkpoints into `workdir`; returns the workdir's config."""
  argv = (presets.PRESETS[preset].argv() if preset else []) + list(flag_argv)
  flags = presets.parse_flags(argv)
  for name in ("predict_xstart", "rescale_timesteps", "use_kl"):
    if flags[name]:
      raise errors.InputError(f"--{name} True is not supported: cfg-jax samples ε-prediction "
                              "models on unscaled timesteps.")
  sampling = _sampling_section(flags)
  _check_workdir_free(workdir)
  model_config = presets.model_config(flags, dtype=dtype)
  params = _ported(diffusion, model_config, "model")
  classifier_params = None
  if classifier is not None:
    classifier_params = _ported(classifier, presets.classifier_config(flags, dtype=dtype),
                                "classifier")
  else:
    sampling.pop("classifier_scale")
  config = {
      "model": {"family": "adm", "flags": flags, "dtype": dtype},
      "classifier": {"model": {"family": "adm", "flags": flags, "dtype": dtype}},
      "diffusion": {"schedule": flags["noise_schedule"],
                    "num_timesteps": flags["diffusion_steps"]},
      "data": {"name": f"imagenet{flags['image_size']}"},
      "sampling": sampling,
      "source": {"format": "guided-diffusion", "diffusion": os.path.abspath(diffusion),
                 "classifier": classifier and os.path.abspath(classifier), "preset": preset},
  }
  paths.make_folder(workdir, "choose another --workdir")
  _save(paths.diffusion_checkpoints(workdir), {"ema_params": params}, config)
  if classifier_params is not None:
    _save(paths.classifier_checkpoints(workdir), {"params": classifier_params}, config)
  return config


def _check_workdir_free(workdir: str) -> None:
  """Conversion never writes over a model: every checkpoint folder must be absent."""
  for directory in (paths.diffusion_checkpoints(workdir), paths.classifier_checkpoints(workdir),
                    paths.vae_checkpoints(workdir)):
    if os.path.exists(directory):
      raise errors.OutputExistsError(f"{directory} exists; convert into a new --workdir.")
  paths.check_folder_usable(workdir, f"the workdir {workdir}", "choose another --workdir")


def _sampling_section(flags) -> dict:
  """guided-diffusion's sampler flags as the workdir's sampling defaults.

  Its "N" respacing (N steps spread evenly, `space_timesteps`) is timestep_spacing
  "linspace"; "ddimN" (every T//N-th step from 0) is "leading" with DDIM.
  """
  respacing = str(flags["timestep_respacing"]) or str(flags["diffusion_steps"])
  ddim = respacing.startswith("ddim") or flags["use_ddim"]
  count = respacing[len("ddim"):] if respacing.startswith("ddim") else respacing
  if not count.isdigit():
    raise errors.InputError(f"--timestep_respacing {respacing!r} is not supported; give N "
                            "(N evenly spread steps) or ddimN.")
  return {"method": "ddim" if ddim else "ddpm", "num_steps": int(count), "eta": 0.0,
          "timestep_spacing": "leading" if respacing.startswith("ddim") else "linspace",
          "classifier_scale": float(flags["classifier_scale"])}


def _ported(path: str, config, what: str):
  """The params of the checkpoint at `path` for `config`, or a one-line error naming the
  first key that differs and the preset whose flags would fit."""
  state_dict = port.read_torch_state_dict(path)
  try:
    return port.to_params(state_dict, config)
  except errors.InputError as e:
    fits = _fitting_presets(state_dict, what)
    hint = (f"; the {' or '.join(fits)} preset fits it (--preset {fits[0]})" if fits
            else "; check the model flags")
    raise errors.InputError(f"{path}: {e}{hint}.") from None


def _fitting_presets(state_dict, what: str) -> list[str]:
  shapes = {name: tuple(value.shape) for name, value in state_dict.items()}
  fits = []
  for name, preset in presets.PRESETS.items():
    flags = preset.flags()
    config = (presets.model_config(flags) if what == "model"
              else presets.classifier_config(flags))
    if port.expected_shapes(config) == shapes:
      fits.append(name)
  return fits


def _save(directory: str, state: dict, config: dict) -> None:
  manager = checkpoints.manager(directory, max_to_keep=1)
  checkpoints.save(manager, 0, state, config)
  manager.wait_until_finished()


# ----------------------------------------------------------------------------- DiT

_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_SCHEDULERS = {"DDIMScheduler": "ddim", "DDPMScheduler": "ddpm",
               "DPMSolverMultistepScheduler": "dpmpp_2m"}
_ORIGINAL_NAME = re.compile(r"DiT-(S|B|L|XL)-([248])-(\d+)x\d+")


def convert_dit(*, workdir: str, pretrained: Optional[str] = None,
                checkpoint: Optional[str] = None, vae_dir: Optional[str] = None,
                model: Optional[str] = None, image_size: Optional[int] = None,
                guided_channels: Optional[int] = None, dtype: str = "float32") -> dict:
  """Converts a diffusers DiT pipeline folder (`pretrained`), or a checkpoint of DiT's own code
  with a diffusers VAE folder, into `workdir`; returns the workdir's config."""
  _check_workdir_free(workdir)
  if pretrained is not None:
    if checkpoint or vae_dir or model or image_size:
      raise errors.InputError("--pretrained holds the whole model; --checkpoint, --vae, "
                              "--model and --image_size go with --checkpoint only.")
    _read_json(os.path.join(pretrained, "model_index.json"), "a diffusers pipeline folder")
    vae_dir = os.path.join(pretrained, "vae")
  elif vae_dir is None:
    raise errors.InputError("--checkpoint needs --vae, the Stable Diffusion VAE's diffusers "
                            "folder (e.g. stabilityai/sd-vae-ft-ema).")
  if os.path.isfile(os.path.join(vae_dir, "vae", "config.json")):
    vae_dir = os.path.join(vae_dir, "vae")  # a pipeline folder given as --vae
  vae_config = dit_port.config_from_diffusers_vae(
      _read_json(os.path.join(vae_dir, "config.json"), "a diffusers AutoencoderKL folder"), dtype)
  factor = 2 ** (len(vae_config.block_out_channels) - 1)  # the VAE's downsampling
  if pretrained is not None:
    net_config = dit_port.config_from_diffusers_dit(
        _read_json(os.path.join(pretrained, "transformer", "config.json")), dtype)
    state_dict = dit_port.read_state_dict(_weights_file(os.path.join(pretrained, "transformer")))
    net_config.per_block_embedder = not dit_port.embedders_tied(state_dict, net_config.depth)
    params = dit_port.dit_params_from_diffusers(state_dict, net_config)
    sampling = _scheduler_sampling(
        _read_json(os.path.join(pretrained, "scheduler", "scheduler_config.json"),
                   "a diffusers scheduler config"))
    source = {"format": "diffusers", "pretrained": os.path.abspath(pretrained)}
  else:
    model, image_size = _original_model(checkpoint, model, image_size, factor)
    latent_size = image_size // factor
    net_config = dit_port.dit_config(model, image_shape=(latent_size, latent_size,
                                                         vae_config.latent_channels), dtype=dtype)
    params = dit_port.dit_params_from_original(dit_port.read_state_dict(checkpoint), net_config)
    # DiT's sample.py: DDPM on 250 evenly spread steps (guided-diffusion's "250").
    sampling = {"method": "ddpm", "num_steps": 250, "eta": 0.0, "timestep_spacing": "linspace",
                "clip_denoised": False}
    source = {"format": "dit", "checkpoint": os.path.abspath(checkpoint)}
  vae_params = dit_port.vae_params_from_diffusers(
      dit_port.read_state_dict(_weights_file(vae_dir)), vae_config)
  height, width, channels = net_config.image_shape
  if channels != vae_config.latent_channels:
    raise errors.InputError(f"The DiT takes {channels} latent channels but the VAE in {vae_dir} "
                            f"makes {vae_config.latent_channels}.")
  vae_config.image_shape = (height * factor, width * factor, vae_config.out_channels)
  if guided_channels is not None:
    if not 0 < guided_channels <= channels:
      raise errors.InputError(f"--guided_channels must be in 1..{channels}, got "
                              f"{guided_channels}.")
    sampling["guided_channels"] = guided_channels
  config = {
      "model": {"family": "dit", **net_config.to_dict()},
      "latent": vae_config.to_dict(),
      "diffusion": {"schedule": "linear", "num_timesteps": 1000},
      "data": {"name": f"imagenet{height * factor}"},
      "sampling": sampling,
      "source": {**source, "vae": os.path.abspath(vae_dir)},
  }
  paths.make_folder(workdir, "choose another --workdir")
  _save(paths.diffusion_checkpoints(workdir), {"ema_params": params}, config)
  _save(paths.vae_checkpoints(workdir), {"params": vae_params}, config)
  return config


def _read_json(path: str, what: str = "a config") -> dict:
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"{path}: no such file; expected {what}.")
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.InputError(f"{path}: not valid JSON ({e}).") from None


def _weights_file(folder: str) -> str:
  """A diffusers model folder's weights, safetensors first."""
  for name in _WEIGHTS:
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  raise errors.MissingFileError(f"{folder}: no weights ({' or '.join(_WEIGHTS[::2])}).")


def _scheduler_sampling(scheduler: dict) -> dict:
  """The sampling defaults of a diffusers scheduler config, which must describe the linear
  β schedule DiT was trained with, on ε-prediction."""
  name = scheduler.get("_class_name")
  if name not in _SCHEDULERS:
    raise errors.InputError(f"scheduler {name!r} is not supported; one of "
                            f"{', '.join(_SCHEDULERS)}.")
  expected = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
              "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 0,
              "trained_betas": None}
  for field, value in expected.items():
    if scheduler.get(field, value) != value:
      raise errors.InputError(f"scheduler config: {field}={scheduler[field]!r} is not "
                              f"supported (DiT's is {value!r}).")
  if name == "DDIMScheduler" and not scheduler.get("set_alpha_to_one", True):
    raise errors.InputError("scheduler config: set_alpha_to_one=false is not supported.")
  # DiTPipeline's default: 50 steps; diffusers' default spacing is "leading"
  # (DPM-Solver++'s "linspace").
  default_spacing = "linspace" if name == "DPMSolverMultistepScheduler" else "leading"
  if scheduler.get("clip_sample") and scheduler.get("clip_sample_range", 1.0) != 1.0:
    raise errors.InputError("scheduler config: clip_sample_range other than 1 is not "
                            "supported.")
  return {"method": _SCHEDULERS[name], "num_steps": 50, "eta": 0.0,
          "timestep_spacing": scheduler.get("timestep_spacing", default_spacing),
          "clip_denoised": bool(scheduler.get("clip_sample", False))}


def _original_model(checkpoint: str, model: Optional[str], image_size: Optional[int],
                    factor: int):
  """(DiT name, image size) of a DiT checkpoint: given, or read from its file name."""
  match = _ORIGINAL_NAME.search(os.path.basename(checkpoint))
  if match:
    model = model or f"DiT-{match[1]}/{match[2]}"
    image_size = image_size or int(match[3])
  if model is None or image_size is None:
    raise errors.InputError(f"Cannot tell the model of {checkpoint} from its name; pass "
                            "--model DiT-XL/2 --image_size 256 (say).")
  if image_size % factor:
    raise errors.InputError(f"--image_size {image_size} is not a multiple of the VAE's "
                            f"downsampling, {factor}.")
  return model, image_size
