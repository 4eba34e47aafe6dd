"""The command-line flags the entry points share, and turning them into library arguments.

`define_sampler_flags()` defines the guidance and sampler flags of `sample.py` and `sweep.py`;
`rule_keywords()` then gives `sample_job.guidance_rule`'s keywords (less the scale),
`sampler_keywords()` the sampler's, and `make_rule` builds the `cfg_jax.guidance` rule they
describe. Errors here name the flags; the library's own name its arguments.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

from absl import flags

from cfg_jax import errors, guidance, sampling

FLAGS = flags.FLAGS
_RULE_OPTIONS = ("interval", "weight_schedule", "rescale", "apg_eta", "apg_momentum",
                 "apg_norm_threshold", "zero_init_steps", "weak_workdir", "weak_step",
                 "uncond_workdir")

if "multihost" not in FLAGS:  # every entry point has it; defined once per process
  flags.DEFINE_bool("multihost", False, "Join the other processes of a multi-host job "
                    "(SLURM, TPU pod slice, ...; see cfg_jax/distributed.py). Also on when "
                    "JAX_COORDINATOR_ADDRESS is set.")


def define_sampler_flags():
  """The sampler and guidance flags of sample.py and sweep.py."""
  flags.DEFINE_enum("method", None, sampling.METHODS, "Sampler (dpmpp_2m: DPM-Solver++(2M)); "
                    "default: the model's (ddim for digits, ddpm for a converted ADM).")
  flags.DEFINE_integer("num_steps", None, "Denoising steps; default: the model's (50 for "
                       "digits, 250 for a converted ADM).")
  flags.DEFINE_enum("guidance", "cfg", KINDS, "Guidance rule: classifier-free (cfg), "
                    "adaptive projected (apg), CFG++ (cfgpp, DDIM only), autoguidance, "
                    "CFG-Zero* (cfgzero) or independent condition guidance (icg: needs no "
                    "null label).")
  flags.DEFINE_string("interval", None, "cfg: guide only where sigma_lo < σ_t <= sigma_hi, "
                      "given as 'sigma_lo,sigma_hi' (e.g. 0.28,5.42; 'inf' allowed).")
  flags.DEFINE_enum("weight_schedule", None, guidance.WEIGHT_SCHEDULES, "cfg: γ_t over time "
                    "(mean γ); default constant.")
  flags.DEFINE_float("rescale", None, "cfg: rescaled CFG's φ in [0, 1]; default 0.")
  flags.DEFINE_float("apg_eta", None, "apg: weight η of the parallel component; default 0.")
  flags.DEFINE_float("apg_momentum", None, "apg: momentum β (e.g. -0.5); default 0 (off).")
  flags.DEFINE_float("apg_norm_threshold", None, "apg: norm cap r; default 0 (off).")
  flags.DEFINE_integer("zero_init_steps", None, "cfgzero: the first K steps leave x_T as it "
                       "is (CFG-Zero*'s zero-init); default 0.")
  flags.DEFINE_string("weak_workdir", None, "autoguidance: workdir of the weak model (a "
                      "smaller or shorter run); default: --workdir with --weak_step.")
  flags.DEFINE_integer("weak_step", None, "autoguidance: checkpoint step of the weak model, "
                       "e.g. one kept with --config.train.keep_steps; default: its latest.")
  flags.DEFINE_string("uncond_workdir", None, "cfg: workdir of a separate unconditional "
                      "network (same data set and schedule) whose ε is ε_u, e.g. to guide "
                      "a model without a null label.")
  flags.DEFINE_integer("guided_channels", None, "Guide only the first K channels of ε, the "
                       "rest keep the conditional ε (DiT's own sampler: 3 of 4 latent "
                       "channels); default: the model's (all).")
  flags.DEFINE_enum("timestep_spacing", None, sampling.SPACINGS, "Visited timesteps, as in "
                    "diffusers; default: the model's (leading; linspace for a converted ADM).")
  flags.DEFINE_float("dynamic_threshold", None, "Imagen's dynamic thresholding percentile p "
                     "in (0, 1], in place of clipping x0; default off.")


def rule_keywords() -> dict:
  """`sample_job.guidance_rule`'s keywords from the flags, less `guidance_scale`."""
  return {"guidance": FLAGS.guidance, **{name: FLAGS[name].value for name in _RULE_OPTIONS}}


def sampler_keywords() -> dict:
  """The sampler options the flags set (those left unset keep the sampler's defaults)."""
  keywords = dict(method=FLAGS.method, num_steps=FLAGS.num_steps,
                  timestep_spacing=FLAGS.timestep_spacing,
                  dynamic_threshold=FLAGS.dynamic_threshold,
                  guided_channels=FLAGS.guided_channels)
  return {k: v for k, v in keywords.items() if v is not None}


def floats(values, name):
  """absl list flag → finite floats, or an InputError naming the flag."""
  try:
    out = [float(v) for v in values if v != ""]
  except ValueError:
    out = None
  if out is None or not all(math.isfinite(v) for v in out):
    raise errors.InputError(f"--{name} must be comma-separated finite numbers, got "
                            f"{','.join(values)!r}.")
  return out


def parse_labels(text: Optional[str]) -> Optional[list[Union[int, str]]]:
  """"3,5" → [3, 5]; "263,golden retriever" → [263, "golden retriever"] (a class name, which
  `data.class_names.resolve` looks up once the model is loaded); empty or None → None
  (balanced over all classes)."""
  if not text:
    return None
  tokens = [v.strip() for v in text.split(",")]
  if not all(tokens):
    raise errors.InputError(f"--labels must be comma-separated class ids or names, got "
                            f"{text!r}.")
  return [int(v) if v.lstrip("-").isdigit() else v for v in tokens]


# The --guidance names of the rules, and the scale each takes when none is given.
KINDS = ("cfg", "apg", "cfgpp", "autoguidance", "cfgzero", "icg")
DEFAULT_SCALES = {"cfg": 3.0, "apg": 3.0, "cfgpp": 0.6, "autoguidance": 2.0, "cfgzero": 3.0,
                  "icg": 3.0}
_KIND_OPTIONS = {
    "cfg": ("interval", "weight_schedule", "rescale"),
    "apg": ("apg_eta", "apg_momentum", "apg_norm_threshold"),
    "cfgpp": (),
    "autoguidance": (),
    "cfgzero": ("zero_init_steps",),
    "icg": (),
}


def make_rule(kind: str = "cfg", scale=None, *, method: Optional[str] = None,
              weak_eps_fn=None, uncond_eps_fn=None, distilled: bool = False, **options):
  """The rule that the sample.py/sweep.py flags describe; None means "not given".

  Args:
    kind: one of KINDS.
    scale: the rule's scale (a scalar or a 1-D array to sweep); None: DEFAULT_SCALES[kind].
    method: the sampler, when known, so CFG++ off DDIM fails before any model is loaded.
    weak_eps_fn: autoguidance's weaker ε-function.
    uncond_eps_fn: cfg's separate unconditional network (`guidance.CFG.uncond_eps_fn`).
    distilled: the model is a guidance-distilled student: plain cfg at γ becomes
      `guidance.Distilled(γ)`, one pass per step; other rules and options are refused.
    **options: `interval` ("lo,hi" or a pair, in σ), `weight_schedule`, `rescale` (cfg);
      `apg_eta`, `apg_momentum`, `apg_norm_threshold` (apg); `zero_init_steps` (cfgzero).
      Errors name them as flags. icg takes its classes from the model when it samples.
  """
  if kind not in KINDS:
    raise errors.InputError(f"Unknown --guidance {kind!r}; use one of {', '.join(KINDS)}.")
  known = {name for names in _KIND_OPTIONS.values() for name in names}
  for name, value in options.items():
    if name not in known:
      raise TypeError(f"make_rule got an unknown option {name!r}.")
    if value is not None and name not in _KIND_OPTIONS[kind]:
      owner = next(k for k, names in _KIND_OPTIONS.items() if name in names)
      raise errors.InputError(f"--{name} applies to --guidance={owner} only, not "
                              f"--guidance={kind}.")
  if kind != "autoguidance" and weak_eps_fn is not None:
    raise errors.InputError(f"A weak model applies to --guidance=autoguidance only, not "
                            f"--guidance={kind}.")
  if kind != "cfg" and uncond_eps_fn is not None:
    raise errors.InputError(f"A separate unconditional network applies to --guidance=cfg only, "
                            f"not --guidance={kind}.")
  if kind == "cfgpp" and method not in (None, "ddim"):
    raise errors.InputError(f"--guidance=cfgpp works with --method=ddim only, got "
                            f"--method={method}.")
  scale = DEFAULT_SCALES[kind] if scale is None else scale
  given = {k: v for k, v in options.items() if v is not None}
  if distilled:
    if kind != "cfg" or given or uncond_eps_fn is not None:
      flag = f"--guidance={kind}" if kind != "cfg" else (
          f"--{next(iter(given))}" if given else "A separate unconditional network")
      raise errors.InputError(f"{flag} cannot guide a guidance-distilled student, which takes "
                              "γ as an input; use --guidance=cfg with --guidance_scale alone, "
                              "or sample its teacher.")
    return guidance.Distilled(scale=scale)
  if kind == "cfg":
    if "interval" in given:
      given["interval"] = parse_interval(given["interval"])
    return guidance.CFG(scale=scale, uncond_eps_fn=uncond_eps_fn, **given)
  if kind == "apg":
    return guidance.APG(scale=scale, **{k[len("apg_"):]: v for k, v in given.items()})
  if kind == "cfgpp":
    return guidance.CFGPlusPlus(scale=scale)
  if kind == "cfgzero":
    return guidance.CFGZeroStar(scale=scale, **given)
  if kind == "icg":
    return guidance.IndependentCondition(scale=scale)
  if weak_eps_fn is None:
    raise errors.InputError("--guidance=autoguidance needs a weak model; pass --weak_step N (an "
                            "earlier checkpoint of this run) or --weak_workdir DIR.")
  return guidance.Autoguidance(scale=scale, weak_eps_fn=weak_eps_fn)


def parse_interval(value) -> Tuple[float, float]:
  """"lo,hi" (σ; "inf" allowed) or a pair → (lo, hi) with 0 <= lo < hi."""
  parts = value.split(",") if isinstance(value, str) else value
  try:
    lo, hi = (float(v) for v in parts)
  except (TypeError, ValueError):
    raise errors.InputError(f"--interval must be two numbers sigma_lo,sigma_hi (e.g. 0.28,5.42), "
                            f"got {value!r}.") from None
  if not (0 <= lo < hi) or math.isnan(hi):
    raise errors.InputError(f"--interval needs 0 <= sigma_lo < sigma_hi, got {lo:g},{hi:g}.")
  return lo, hi
