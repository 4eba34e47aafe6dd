"""Guidance rules: how the passes of the ε-model combine into the ε̂ a sampler steps with.

Each rule is a small pytree (`flax.struct.dataclass`): its numeric fields are traced, so a new
value never recompiles the sampler, while its kind and string fields are static. Pass one to
`sampling.sample(..., guidance=RULE)`.

Notation (per example; D denotes an x0-prediction, as in Karras et al. and Sadat et al.):

| name       | symbol | meaning                                                   |
| ---------- | ------ | --------------------------------------------------------- |
| `eps_c`    | ε_c    | ε(x_t, t, y), the conditional pass                        |
| `eps_u`    | ε_u    | ε(x_t, t, ∅), the unconditional pass                      |
| `eps_guide`| ε_ŷ    | ε(x_t, t, ŷ), ICG's pass at an independent random label ŷ |
| `x0_c`     | D_c    | (x_t − sqrt(1 − ᾱ_t)·ε_c) / sqrt(ᾱ_t)                     |
| `x0_u`     | D_u    | the same for ε_u                                          |
| `sigma`    | σ_t    | sqrt((1 − ᾱ_t) / ᾱ_t), the noise level of x_t/sqrt(ᾱ_t)  |
| `gamma`    | γ, w   | the guidance scale; γ = 0 unconditional, γ = 1 conditional |

`combine` returns (ε̂, ε̂_renoise, state): ε̂ forms x̂0 and ε̂_renoise the direction back to the
next x (they differ only for CFG++); `state` is carried through the sampler's scan.
`Distilled` combines nothing: its student computes ε̂ itself, from w.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Tuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from cfg_jax import diffusion, errors
from cfg_jax.schedules import Schedule

WEIGHT_SCHEDULES = ("constant", "linear", "cosine")


class StepContext(NamedTuple):
  """What a rule may look at besides the predictions: x_t and its timesteps (B,)."""

  schedule: Schedule
  x_t: jnp.ndarray
  t: jnp.ndarray

  @property
  def sigma(self):
    """σ_t = sqrt((1 − ᾱ_t)/ᾱ_t), shape (B,), from the schedule's float64-derived tables."""
    signal, noise_std = self.schedule.scales(self.t)
    return noise_std / signal

  def x0(self, eps):
    return diffusion.predict_x0_from_eps(self.schedule, self.x_t, self.t, eps)

  def eps(self, x0):
    return diffusion.predict_eps_from_x0(self.schedule, self.x_t, self.t, x0)


@flax.struct.dataclass
class CFG:
  """Classifier-free guidance (Ho & Salimans 2021, eq. (6)): ε̂ = ε_u + γ_t·(ε_c − ε_u).

  Attributes:
    scale: γ; a scalar or a 1-D array of scales to sweep in one call.
    interval: (sigma_lo, sigma_hi), Kynkäänniemi et al. 2024, "Applying guidance in a limited
      interval": guide only where sigma_lo < σ_t ≤ sigma_hi, elsewhere ε̂ = ε_c. None guides
      everywhere. sigma_hi may be inf.
    weight_schedule: γ_t over time (Wang et al. 2024), each with mean γ over t ∈ [0, T]:
      "constant" γ_t = γ; "linear" γ_t = γ·2(1 − t/T); "cosine" γ_t = γ·(cos(π t/T) + 1).
    rescale: φ ∈ [0, 1], Lin et al. 2024 ("Common diffusion noise schedules and sample steps
      are flawed", rescaled CFG): ε̂ ← φ·ε̂·std(ε_c)/std(ε̂) + (1 − φ)·ε̂, stds per example
      over all pixels (diffusers' `rescale_noise_cfg`).
    uncond_eps_fn: ε_u from a separate unconditional network (EDM2's, or a released
      unconditional model beside a conditional one that has no null label):
      `uncond_eps_fn(x_t, t, y) -> ε`, called with the labels y of the conditional pass, which
      an unconditional network ignores (bind a conditional network's null label with a
      `Partial` to use that instead). Ideally a `jax.tree_util.Partial` over its parameters.
      None: ε_u = ε(x_t, t, ∅) of the model itself.
  """

  scale: Any = 1.0
  interval: Optional[Tuple[Any, Any]] = None
  weight_schedule: str = flax.struct.field(pytree_node=False, default="constant")
  rescale: Any = 0.0
  uncond_eps_fn: Any = None

  def __post_init__(self):
    if self.weight_schedule not in WEIGHT_SCHEDULES:
      raise errors.InputError(f"Unknown weight_schedule {self.weight_schedule!r}; use one of "
                              f"{WEIGHT_SCHEDULES}.")
    self.validate()

  def validate(self):
    _check_scale("CFG scale", self.scale)
    _check_scalar("CFG rescale", self.rescale, lambda v: 0 <= v <= 1, "in [0, 1]")
    _check_eps_fn("CFG uncond_eps_fn", self.uncond_eps_fn)
    if self.interval is not None:
      if not isinstance(self.interval, (tuple, list)) or len(self.interval) != 2:
        raise errors.InputError(f"CFG interval must be (sigma_lo, sigma_hi), got "
                                f"{self.interval!r}.")
      lo, hi = (_concrete(v) for v in self.interval)
      if lo is not None and hi is not None and not (
          lo.shape == hi.shape == () and 0 <= lo < hi and not np.isnan(hi)):
        raise errors.InputError(f"CFG interval needs 0 <= sigma_lo < sigma_hi, got "
                                f"({float(lo)}, {float(hi)}).")

  def init_state(self, x):
    return ()

  def gamma_t(self, ctx: StepContext):
    """γ_t per example (B,): the schedule's weight, and 1 (ε̂ = ε_c) outside the interval."""
    frac = ctx.t.astype(jnp.float32) / ctx.schedule.num_timesteps  # t/T
    if self.weight_schedule == "constant":
      weight = jnp.ones_like(frac)
    elif self.weight_schedule == "linear":
      weight = 2.0 * (1.0 - frac)
    else:
      weight = jnp.cos(math.pi * frac) + 1.0
    gamma = self.scale * weight
    if self.interval is not None:
      sigma_lo, sigma_hi = self.interval
      inside = (ctx.sigma > sigma_lo) & (ctx.sigma <= sigma_hi)
      gamma = jnp.where(inside, gamma, 1.0)
    return gamma

  def combine(self, ctx: StepContext, eps_c, eps_u, state):
    gamma = diffusion.per_example(self.gamma_t(ctx), eps_c)
    eps = eps_u + gamma * (eps_c - eps_u)  # Ho & Salimans eq. (6), w = γ − 1
    # Lin et al.'s rescaled CFG; φ = 0 leaves ε̂ bit-for-bit as it is.
    ratio = _per_example_std(eps_c) / _per_example_std(eps)
    ratio = jnp.where(jnp.isfinite(ratio), ratio, 1.0)  # std(ε̂) = 0: nothing to rescale
    rescaled = eps * diffusion.per_example(ratio, eps)
    eps = self.rescale * rescaled + (1.0 - self.rescale) * eps
    return eps, eps, state


@flax.struct.dataclass
class APG:
  """Adaptive projected guidance (Sadat et al. 2024, arXiv 2410.02416), on x0-predictions D.

  Δ = D_c − D_u; reverse momentum: m ← Δ + β·m, Δ ← m, with m = 0 at the first step;
  rescaling: Δ ← Δ·min(1, r/‖Δ‖); projection: Δ∥ = (⟨Δ, D_c⟩/⟨D_c, D_c⟩)·D_c, Δ⊥ = Δ − Δ∥;
  update: D̂ = D_c + (w − 1)(Δ⊥ + η·Δ∥), and ε̂ is re-derived from D̂. Norms and inner
  products are per example over all pixels.

  Attributes:
    scale: w (w = 1 is the conditional model); scalar or a 1-D array to sweep.
    eta: η, the weight of the parallel component; the paper's default is 0 (diffusers uses 1).
    momentum: β; 0 turns momentum off (the paper finds negative values, e.g. −0.5, help).
    norm_threshold: r; r ≤ 0 turns the norm cap off.
  """

  scale: Any = 1.0
  eta: Any = 0.0
  momentum: Any = 0.0
  norm_threshold: Any = 0.0

  def __post_init__(self):
    self.validate()

  def validate(self):
    _check_scale("APG scale", self.scale)
    _check_scalar("APG eta", self.eta)
    _check_scalar("APG momentum", self.momentum)
    _check_scalar("APG norm_threshold", self.norm_threshold)

  def init_state(self, x):
    return jnp.zeros_like(x)  # the momentum buffer m, 0 before the first step

  def combine(self, ctx: StepContext, eps_c, eps_u, state):
    x0_c, x0_u = ctx.x0(eps_c), ctx.x0(eps_u)
    delta = x0_c - x0_u
    delta = delta + self.momentum * state  # momentum: m ← Δ + β·m, then Δ ← m
    state = delta
    norm = _per_example_norm(delta)
    cap = jnp.minimum(1.0, self.norm_threshold / jnp.where(norm > 0, norm, 1.0))
    cap = jnp.where(self.norm_threshold > 0, cap, 1.0)
    delta = delta * diffusion.per_example(cap, delta)  # rescaling: Δ·min(1, r/‖Δ‖)
    dot = _per_example_sum(delta * x0_c)
    sq = _per_example_sum(x0_c * x0_c)
    coef = jnp.where(sq > 0, dot / jnp.where(sq > 0, sq, 1.0), 0.0)
    parallel = diffusion.per_example(coef, delta) * x0_c  # Δ∥, the projection on D_c
    orthogonal = delta - parallel  # Δ⊥
    x0 = x0_c + (self.scale - 1.0) * (orthogonal + self.eta * parallel)  # D̂
    eps = ctx.eps(x0)
    return eps, eps, state


@flax.struct.dataclass
class CFGPlusPlus:
  """CFG++ (Chung et al. 2024), in its DDIM form; DDIM only.

  x̂0 is formed from ε̂ = ε_u + λ(ε_c − ε_u), λ ∈ [0, 1], and the renoising direction of the
  DDIM step uses ε_u instead of ε̂.

  Attributes:
    scale: λ ∈ [0, 1]; scalar or a 1-D array to sweep.
  """

  scale: Any = 0.5

  def __post_init__(self):
    self.validate()

  def validate(self):
    _check_scale("CFGPlusPlus scale", self.scale, lambda v: 0 <= v <= 1, "in [0, 1]")

  def init_state(self, x):
    return ()

  def combine(self, ctx: StepContext, eps_c, eps_u, state):
    eps = eps_u + self.scale * (eps_c - eps_u)
    return eps, eps_u, state


@flax.struct.dataclass
class Autoguidance:
  """Autoguidance (Karras et al. 2024): ε̂ = ε_weak + w·(ε_main − ε_weak).

  Both passes are conditional on the same labels; the weak model is, e.g., an early checkpoint
  of the same run or a smaller config.

  Attributes:
    scale: w (w = 1 is the main model alone); scalar or a 1-D array to sweep.
    weak_eps_fn: `weak_eps_fn(x_t, t, y) -> ε`, ideally a `jax.tree_util.Partial` over its
      parameters so they are traced (a plain function is wrapped in one).
  """

  scale: Any = 1.0
  weak_eps_fn: Any = None

  def __post_init__(self):
    self.validate()

  def validate(self):
    _check_scale("Autoguidance scale", self.scale)
    _check_eps_fn("Autoguidance weak_eps_fn", self.weak_eps_fn)

  def init_state(self, x):
    return ()

  def combine(self, ctx: StepContext, eps_main, eps_weak, state):
    eps = eps_weak + self.scale * (eps_main - eps_weak)
    return eps, eps, state


@flax.struct.dataclass
class CFGZeroStar:
  """CFG-Zero* (Fan et al. 2025, arXiv 2503.18886): an optimized scale and zero-init.

  Optimized scale: s* = ⟨ε_c, ε_u⟩ / (‖ε_u‖² + 1e-8) per example over all pixels (the 1e-8
  as in the paper's code and diffusers' `cfg_zero_star_scale`: ε_u = 0 gives s* = 0), and
  ε̂ = s*·ε_u + γ·(ε_c − s*·ε_u). s* = 1 is CFG.

  Zero-init: the paper zeroes a flow model's velocity v at its first K solver steps, so that
  x_{t−dt} = x_t − dt·v stays where it is. Here likewise the first K visited steps leave x
  as it is, x_{t_prev} = x_t, whatever the sampler (`holds_x`), and sampling goes on from
  x_T at the (K+1)-th visited timestep as if it had started there: DPM-Solver++ restarts its
  multistep history with a first-order step. ε̂ = 0 (diffusers' zeroed prediction taken
  literally for an ε-model) would instead scale DDIM's x by sqrt(ᾱ_{t_prev}/ᾱ_t), and no ε̂
  holds x for every sampler (DDPM adds noise, clipping re-derives ε), so the sampler itself
  holds x. The held steps still run the model, so that every K shares one compiled program.

  Attributes:
    scale: γ (γ = 1 is the conditional model); scalar or a 1-D array to sweep.
    zero_init_steps: K ≥ 0, the first visited steps that leave x as it is (counted as
      diffusers' `zero_init_steps`); traced, so a new K does not recompile.
  """

  scale: Any = 1.0
  zero_init_steps: Any = 0

  def __post_init__(self):
    self.validate()

  def validate(self):
    _check_scale("CFGZeroStar scale", self.scale)
    steps = _concrete(self.zero_init_steps)
    if steps is not None and (steps.shape != () or not np.isfinite(steps) or steps < 0
                              or steps != np.round(steps)):
      raise errors.InputError(f"CFGZeroStar zero_init_steps must be a non-negative integer, got "
                              f"{_show(steps)}.")

  def init_state(self, x):
    return ()

  def holds_x(self, step):
    """Whether the visited step `step` (0: the first) is one of the K that leave x as it is."""
    return step < self.zero_init_steps

  def combine(self, ctx: StepContext, eps_c, eps_u, state):
    eps_u = diffusion.per_example(_optimized_scale(eps_c, eps_u), eps_u) * eps_u  # s*·ε_u
    eps = eps_u + self.scale * (eps_c - eps_u)
    return eps, eps, state


@flax.struct.dataclass
class IndependentCondition:
  """Independent condition guidance, ICG (Sadat et al. 2025, "No training, no problem:
  rethinking classifier-free guidance for diffusion models", ICLR).

  CFG with the unconditional pass replaced by the same model at an independent label ŷ:
  ε̂ = ε_ŷ + γ·(ε_c − ε_ŷ), ε_ŷ = ε(x_t, t, ŷ), ŷ drawn uniformly from 0..num_classes − 1 per
  example and per step, independently of y (`guide_labels`). It needs no null label. An
  example whose own label is the null label is its own guide (ŷ = ∅, so ε̂ = ε_u, as CFG
  gives it).

  Attributes:
    scale: γ (γ = 1 is the conditional model); scalar or a 1-D array to sweep.
    num_classes: the classes ŷ is drawn from; None takes `sampling.sample`'s num_classes.
  """

  scale: Any = 1.0
  num_classes: Optional[int] = flax.struct.field(pytree_node=False, default=None)

  def __post_init__(self):
    self.validate()

  def validate(self):
    _check_scale("IndependentCondition scale", self.scale)
    n = self.num_classes
    if n is not None and (not isinstance(n, (int, np.integer)) or n < 1):
      raise errors.InputError(f"IndependentCondition num_classes must be a positive int or "
                              f"None, got {n!r}.")

  def init_state(self, x):
    return ()

  def guide_labels(self, key, labels, null_label=None):
    """ŷ for `labels` (B,): uniform over the classes, drawn from `key` alone (the sampler
    passes the step's `loop.rule_key`, the same for every scale of a sweep)."""
    drawn = jax.random.randint(key, labels.shape, 0, self.num_classes, labels.dtype)
    if null_label is None:
      return drawn
    return jnp.where(labels == null_label, labels, drawn)

  def combine(self, ctx: StepContext, eps_c, eps_guide, state):
    eps = eps_guide + self.scale * (eps_c - eps_guide)
    return eps, eps, state


@flax.struct.dataclass
class Distilled:
  """Guidance distilled into the model (Meng et al. 2023, "On distillation of guided diffusion
  models", stage 1): a student ε_s(x_t, t, y, w) trained to match its teacher's
  ε̂ = ε_u + w·(ε_c − ε_u) takes w as an input, so each step runs one pass, at the labels.

  For a student only (`cfg_jax.load` of a distilled workdir turns `guidance_scale=w` into this
  rule): the sampler calls `eps_fn(x_t, t, y, w)` with w of shape (B,). Classifier guidance
  composes with it as with any rule.

  Attributes:
    scale: w = γ (0: unconditional, the student at ∅; 1: conditional; Meng et al.'s w is
      γ − 1), best within the range the student was trained on (the pipeline warns outside
      it); scalar or a 1-D array to sweep.
  """

  scale: Any = 1.0

  def __post_init__(self):
    self.validate()

  def validate(self):
    _check_scale("Distilled scale", self.scale)

  def init_state(self, x):
    return ()


RULES = (CFG, APG, CFGPlusPlus, Autoguidance, CFGZeroStar, IndependentCondition, Distilled)


def as_float32(rule):
  """The rule with every numeric field a float32 array (int32 for a number of steps), so
  the compiled sampler is reused whether a value came as a Python number or an array."""
  fields = {"scale": jnp.asarray(rule.scale, jnp.float32)}
  if isinstance(rule, CFG):
    fields["rescale"] = jnp.asarray(rule.rescale, jnp.float32)
    if rule.interval is not None:
      fields["interval"] = tuple(jnp.asarray(v, jnp.float32) for v in rule.interval)
  elif isinstance(rule, APG):
    for name in ("eta", "momentum", "norm_threshold"):
      fields[name] = jnp.asarray(getattr(rule, name), jnp.float32)
  elif isinstance(rule, CFGZeroStar):
    fields["zero_init_steps"] = jnp.asarray(rule.zero_init_steps, jnp.int32)
  return rule.replace(**fields)


def _optimized_scale(eps_c, eps_u):
  """CFG-Zero*'s s* = ⟨ε_c, ε_u⟩ / (‖ε_u‖² + 1e-8), shape (B,)."""
  return _per_example_sum(eps_c * eps_u) / (_per_example_sum(eps_u * eps_u) + 1e-8)


def _per_example_sum(x):
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _per_example_norm(x):
  return jnp.sqrt(_per_example_sum(x * x))


def _per_example_std(x):
  return jnp.std(x.reshape(x.shape[0], -1), axis=-1)


def _check_eps_fn(name, fn):
  if fn is not None and not callable(fn) and not _is_placeholder(fn):
    raise errors.InputError(f"{name} must be callable, got {type(fn).__name__}.")


def _is_placeholder(value):
  # jax rebuilds pytrees with non-array leaves (tracers, None, sentinels) while transforming.
  return isinstance(value, jax.core.Tracer) or type(value) is object or value is None


def _concrete(value) -> Optional[np.ndarray]:
  """The value as a NumPy array, or None when it is traced or not a number."""
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    array = np.asarray(value)
  except (TypeError, ValueError, jax.errors.ConcretizationTypeError):
    return None
  return array if np.issubdtype(array.dtype, np.number) else None


def _check_scalar(name, value, ok=None, requirement=""):
  array = _concrete(value)
  if array is None:
    return
  if array.shape != () or not np.isfinite(array) or (ok is not None and not ok(array)):
    want = f"a finite scalar {requirement}".rstrip()
    raise errors.InputError(f"{name} must be {want}, got {_show(array)}.")


def _check_scale(name, value, ok=None, requirement=""):
  array = _concrete(value)
  if array is None:
    return
  if (array.ndim > 1 or array.size == 0 or not np.all(np.isfinite(array))
      or (ok is not None and not all(ok(v) for v in array.reshape(-1)))):
    want = f"a finite scalar or 1-D array of scales {requirement}".rstrip()
    raise errors.InputError(f"{name} must be {want}, got {_show(array)}.")


def _show(array):
  """A one-line rendering of a checked value, for error messages."""
  if array.ndim == 0:
    return repr(array.item())
  if array.ndim == 1 and array.size <= 8:
    return repr(array.tolist())
  return f"an array of shape {array.shape}"
