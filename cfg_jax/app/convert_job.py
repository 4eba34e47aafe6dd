"""`convert.py`'s job: a released PyTorch checkpoint → a workdir that `cfg_jax.load`,
`sample.py` and `sweep.py` read like a trained one.

    python convert.py guided-diffusion --diffusion 64x64_diffusion.pt \\
        --classifier 64x64_classifier.pt --workdir runs/adm64 --preset 64x64

guided-diffusion's model and classifier flags follow, with its names and `--flag value`
form (`--class_cond True`), over the preset's (or guided-diffusion's defaults without one),
so its README's MODEL_FLAGS and CLASSIFIER_FLAGS paste in unchanged. Every file is checked
(keys, shapes, that it is a plain state dict) before anything is written; a checkpoint that
does not fit the flags is one line naming the first key that differs and the preset that
fits it.
"""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from cfg_jax import checkpoints, errors, paths
from cfg_jax.models.adm import presets
from cfg_jax.models.adm import port

FORMATS = ("guided-diffusion",)


class _Parser(argparse.ArgumentParser):
  def error(self, message):  # one line and exit status 2, as every other bad input
    raise errors.InputError(f"{message} (see python convert.py --help).")


def parse_args(argv: Sequence[str]):
  """(our options, the rest: guided-diffusion's flags) of `convert.py FORMAT ...`."""
  parser = _Parser(
      prog="convert.py", description="Converts released PyTorch checkpoints to a workdir.")
  parser.add_argument("format", choices=FORMATS)
  parser.add_argument("--diffusion", required=True, help="the diffusion model's .pt or "
                      ".safetensors file")
  parser.add_argument("--classifier", help="the noisy classifier's .pt or .safetensors file")
  parser.add_argument("--workdir", required=True, help="the folder to write")
  parser.add_argument("--preset", choices=sorted(presets.PRESETS),
                      help="a released model's flags (guided-diffusion's README)")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                      help="compute dtype (guided-diffusion's use_fp16 on accelerators)")
  return parser.parse_known_args(list(argv))


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
  for directory in (paths.diffusion_checkpoints(workdir), paths.classifier_checkpoints(workdir)):
    if os.path.exists(directory):
      raise errors.OutputExistsError(f"{directory} exists; convert into a new --workdir.")
  paths.check_folder_usable(workdir, f"the workdir {workdir}", "choose another --workdir")
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
