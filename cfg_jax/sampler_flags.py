"""The guidance and sampler flags that `sample.py` and `sweep.py` share.

Call `define()` when the entry point is imported; `rule_keywords()` then gives
`generate.guidance_rule`'s keywords (less the scale) and `sampler_keywords()` the sampler's.
"""

from __future__ import annotations

from absl import flags

from cfg_jax import guidance, sampling

FLAGS = flags.FLAGS
_RULE_OPTIONS = ("interval", "weight_schedule", "rescale", "apg_eta", "apg_momentum",
                 "apg_norm_threshold", "weak_workdir", "weak_step")


def define():
  flags.DEFINE_enum("guidance", "cfg", guidance.KINDS, "Guidance rule: classifier-free (cfg), "
                    "adaptive projected (apg), CFG++ (cfgpp, DDIM only) or autoguidance.")
  flags.DEFINE_string("interval", None, "cfg: guide only where sigma_lo < σ_t <= sigma_hi, "
                      "given as 'sigma_lo,sigma_hi' (e.g. 0.28,5.42; 'inf' allowed).")
  flags.DEFINE_enum("weight_schedule", None, guidance.WEIGHT_SCHEDULES, "cfg: γ_t over time "
                    "(mean γ); default constant.")
  flags.DEFINE_float("rescale", None, "cfg: rescaled CFG's φ in [0, 1]; default 0.")
  flags.DEFINE_float("apg_eta", None, "apg: weight η of the parallel component; default 0.")
  flags.DEFINE_float("apg_momentum", None, "apg: momentum β (e.g. -0.5); default 0 (off).")
  flags.DEFINE_float("apg_norm_threshold", None, "apg: norm cap r; default 0 (off).")
  flags.DEFINE_string("weak_workdir", None, "autoguidance: workdir of the weak model (a "
                      "smaller or shorter run); default: --workdir with --weak_step.")
  flags.DEFINE_integer("weak_step", None, "autoguidance: checkpoint step of the weak model, "
                       "e.g. one kept with --config.train.keep_steps; default: its latest.")
  flags.DEFINE_enum("timestep_spacing", None, sampling.SPACINGS, "Visited timesteps, as in "
                    "diffusers; default leading.")
  flags.DEFINE_float("dynamic_threshold", None, "Imagen's dynamic thresholding percentile p "
                     "in (0, 1], in place of clipping x0; default off.")


def rule_keywords() -> dict:
  """`generate.guidance_rule`'s keywords from the flags, less `guidance_scale`."""
  return {"guidance": FLAGS.guidance, **{name: FLAGS[name].value for name in _RULE_OPTIONS}}


def sampler_keywords() -> dict:
  """The sampler options the flags set (those left unset keep the sampler's defaults)."""
  keywords = dict(timestep_spacing=FLAGS.timestep_spacing,
                  dynamic_threshold=FLAGS.dynamic_threshold)
  return {k: v for k, v in keywords.items() if v is not None}
