"""guided-diffusion's flags, its released checkpoints' presets, and network configs from them.

The defaults are `guided_diffusion.script_util.model_and_diffusion_defaults()`,
`classifier_defaults()` and the sampling flags of `scripts/classifier_sample.py`, copied as
constants (guided-diffusion is not a dependency). `parse_flags` reads guided-diffusion's own
command-line form (`--name value`, booleans as its `str2bool`), so the README's MODEL_FLAGS
paste in unchanged. `PRESETS` are the README's "Classifier guidance" commands
(openai/guided-diffusion README.md, "Sampling from pre-trained models").

`use_fp16` / `classifier_use_fp16` are kept as flags but do not set the compute dtype: the
released weights are float32, and half precision only pays on accelerators, so the caller
chooses `dtype` (e.g. "bfloat16" on TPU, "float16" on GPU) in `model_config`.
"""

from __future__ import annotations

import dataclasses
import shlex
import types

import ml_collections

from cfg_jax import errors

NUM_CLASSES = 1000

DIFFUSION_DEFAULTS = types.MappingProxyType(dict(
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
))

MODEL_DEFAULTS = types.MappingProxyType(dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=-1,
    attention_resolutions="16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    **DIFFUSION_DEFAULTS,
))

CLASSIFIER_DEFAULTS = types.MappingProxyType(dict(
    image_size=64,
    classifier_use_fp16=False,
    classifier_width=128,
    classifier_depth=2,
    classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
))

# scripts/classifier_sample.py's own flags.
SAMPLE_DEFAULTS = types.MappingProxyType(dict(
    clip_denoised=True,
    num_samples=10000,
    batch_size=16,
    use_ddim=False,
    model_path="",
    classifier_path="",
    classifier_scale=1.0,
))

DEFAULTS = types.MappingProxyType({**MODEL_DEFAULTS, **CLASSIFIER_DEFAULTS, **SAMPLE_DEFAULTS})

# create_model's channel_mult for an empty --channel_mult (create_classifier always uses it).
CHANNEL_MULT = types.MappingProxyType({
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
})

README_SAMPLE_FLAGS = "--batch_size 4 --num_samples 100 --timestep_respacing 250"


@dataclasses.dataclass(frozen=True)
class Preset:
  """One released model: the README's MODEL_FLAGS and the rest of its classifier_sample.py
  command (`sample_flags`: the flags other than paths, e.g. --classifier_scale)."""
  name: str
  model_flags: str
  sample_flags: str
  model_checkpoint: str
  classifier_checkpoint: str

  def argv(self) -> list[str]:
    return shlex.split(f"{self.model_flags} {self.sample_flags} {README_SAMPLE_FLAGS}")

  def flags(self) -> dict:
    return parse_flags(self.argv())


_256 = ("--attention_resolutions 32,16,8 --class_cond {} --diffusion_steps 1000 --image_size 256 "
        "--learn_sigma True --noise_schedule linear --num_channels 256 --num_head_channels 64 "
        "--num_res_blocks 2 --resblock_updown True --use_fp16 True --use_scale_shift_norm True")

PRESETS = types.MappingProxyType({p.name: p for p in (
    Preset("64x64",
           "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
           "--dropout 0.1 --image_size 64 --learn_sigma True --noise_schedule cosine "
           "--num_channels 192 --num_head_channels 64 --num_res_blocks 3 --resblock_updown True "
           "--use_new_attention_order True --use_fp16 True --use_scale_shift_norm True",
           "--classifier_scale 1.0 --classifier_depth 4",
           "64x64_diffusion.pt", "64x64_classifier.pt"),
    Preset("128x128",
           "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
           "--image_size 128 --learn_sigma True --noise_schedule linear --num_channels 256 "
           "--num_heads 4 --num_res_blocks 2 --resblock_updown True --use_fp16 True "
           "--use_scale_shift_norm True",
           "--classifier_scale 0.5",
           "128x128_diffusion.pt", "128x128_classifier.pt"),
    Preset("256x256", _256.format("True"), "--classifier_scale 1.0",
           "256x256_diffusion.pt", "256x256_classifier.pt"),
    Preset("256x256_uncond", _256.format("False"), "--classifier_scale 10.0",
           "256x256_diffusion_uncond.pt", "256x256_classifier.pt"),
    Preset("512x512",
           "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 "
           "--image_size 512 --learn_sigma True --noise_schedule linear --num_channels 256 "
           "--num_head_channels 64 --num_res_blocks 2 --resblock_updown True --use_fp16 False "
           "--use_scale_shift_norm True",
           "--classifier_scale 4.0",
           "512x512_diffusion.pt", "512x512_classifier.pt"),
)})


def str2bool(name, value: str) -> bool:
  """guided-diffusion's str2bool."""
  if value.lower() in ("yes", "true", "t", "y", "1"):
    return True
  if value.lower() in ("no", "false", "f", "n", "0"):
    return False
  raise errors.InputError(f"--{name} takes a boolean (True or False), not {value!r}")


def _convert(name, value: str):
  default = DEFAULTS[name]
  if isinstance(default, bool):
    return str2bool(name, value)
  try:
    return type(default)(value)
  except ValueError:
    raise errors.InputError(
        f"--{name} takes {type(default).__name__} values, not {value!r}") from None


def parse_flags(argv) -> dict:
  """guided-diffusion flags (`["--class_cond", "True", …]`, or `--name=value`) over its
  defaults: one flat dict of every model, classifier and sampling flag, as its scripts'
  argparse namespace. A later repeat of a flag wins."""
  flags = dict(DEFAULTS)
  argv = list(argv)
  i = 0
  while i < len(argv):
    token = argv[i]
    if not token.startswith("--"):
      raise errors.InputError(f"unexpected argument {token!r}: flags are --name value")
    name, eq, value = token[2:].partition("=")
    if name not in DEFAULTS:
      raise errors.InputError(f"unknown guided-diffusion flag --{name}")
    if not eq:
      if i + 1 >= len(argv):
        raise errors.InputError(f"--{name} needs a value")
      i += 1
      value = argv[i]
    flags[name] = _convert(name, value)
    i += 1
  return flags


def preset_flags(name: str) -> dict:
  """The flags of a released model (`PRESETS`): "64x64", "128x128", "256x256",
  "256x256_uncond", "512x512"."""
  if name not in PRESETS:
    raise errors.InputError(f"unknown preset {name!r}; one of {', '.join(PRESETS)}")
  return PRESETS[name].flags()


def _with_defaults(flags) -> dict:
  unknown = sorted(set(flags) - set(DEFAULTS))
  if unknown:
    raise errors.InputError(f"unknown guided-diffusion flag --{unknown[0]}")
  return {**DEFAULTS, **flags}


def _channel_mult(image_size, text=""):
  if text:
    return tuple(int(m) if float(m).is_integer() else float(m) for m in text.split(","))
  if image_size not in CHANNEL_MULT:
    raise errors.InputError(f"no default channel_mult for image_size {image_size}; one of "
                            f"{', '.join(map(str, CHANNEL_MULT))} (or give --channel_mult)")
  return CHANNEL_MULT[image_size]


def _attention_rates(image_size, text):
  """"32,16,8" (resolutions) → downsample rates image_size // resolution."""
  return tuple(image_size // int(res) for res in text.split(","))


def model_config(flags, *, dtype="float32") -> ml_collections.ConfigDict:
  """network.UNetModel's config from guided-diffusion flags (create_model's logic)."""
  f = _with_defaults(flags)
  size = f["image_size"]
  return ml_collections.ConfigDict(dict(
      image_size=size,
      image_shape=(size, size, 3),
      in_channels=3,
      model_channels=f["num_channels"],
      out_channels=6 if f["learn_sigma"] else 3,
      num_res_blocks=f["num_res_blocks"],
      attention_resolutions=_attention_rates(size, f["attention_resolutions"]),
      dropout=float(f["dropout"]),
      channel_mult=_channel_mult(size, f["channel_mult"]),
      conv_resample=True,
      class_cond=f["class_cond"],
      num_classes=NUM_CLASSES,
      num_heads=f["num_heads"],
      num_head_channels=f["num_head_channels"],
      num_heads_upsample=f["num_heads_upsample"],
      use_scale_shift_norm=f["use_scale_shift_norm"],
      resblock_updown=f["resblock_updown"],
      use_new_attention_order=f["use_new_attention_order"],
      use_fp16=f["use_fp16"],
      dtype=dtype,
  ))


def classifier_config(flags, *, dtype="float32") -> ml_collections.ConfigDict:
  """network.EncoderUNetModel's config from guided-diffusion flags (create_classifier's
  logic: channel_mult from the image size, 64 channels per head, no dropout)."""
  f = _with_defaults(flags)
  size = f["image_size"]
  return ml_collections.ConfigDict(dict(
      image_size=size,
      image_shape=(size, size, 3),
      in_channels=3,
      model_channels=f["classifier_width"],
      out_channels=NUM_CLASSES,
      num_classes=NUM_CLASSES,
      num_res_blocks=f["classifier_depth"],
      attention_resolutions=_attention_rates(size, f["classifier_attention_resolutions"]),
      dropout=0.0,
      channel_mult=_channel_mult(size),
      conv_resample=True,
      num_heads=1,
      num_head_channels=64,
      num_heads_upsample=-1,
      use_scale_shift_norm=f["classifier_use_scale_shift_norm"],
      resblock_updown=f["classifier_resblock_updown"],
      use_new_attention_order=False,
      pool=f["classifier_pool"],
      use_fp16=f["classifier_use_fp16"],
      dtype=dtype,
  ))
