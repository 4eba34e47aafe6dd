"""Guidance distillation, stage 1 of Meng et al. 2023 ("On distillation of guided diffusion
models"): a student ε_s(x_t, t, y, w) learns its teacher's classifier-free guided
ε̂ = ε_u + w·(ε_c − ε_u) at a w drawn uniformly per example, so that sampling at any w costs
one pass per step instead of two (`guidance.Distilled`).

w is the project's γ (0: unconditional, 1: conditional; Meng et al.'s w is γ − 1), drawn from
`config.distill.guidance_scale_range`. The student is the teacher's UNet with a w-embedding
(`config.model.guidance_embedding`), initialised from the teacher's EMA parameters (the new
embedding's zero-initialised output makes it the teacher's conditional model at first), and
trained through the shared loop (`loop.fit`) on the teacher's data set and schedule, x_t drawn
from q(x_t | x_0) of real data. Labels are dropped to ∅ with `diffusion.p_uncond`, as in the
teacher's training; there ε_c = ε_u, so the student learns the unconditional ε at every w.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp
import ml_collections
from jax.tree_util import Partial

from cfg_jax import checkpoints, data, diffusion, distributed, models, paths, schedules
from cfg_jax.sampling import guided
from cfg_jax.train import denoiser, loop

# What a student shares with its teacher: the data set (so image shape and classes), the
# noise schedule and the network (less the w-embedding).
TEACHER_SECTIONS = ("data.name", "diffusion.schedule", "diffusion.num_timesteps", "model")
# Model fields the student may set apart from its teacher: they change no parameter.
STUDENT_ONLY_MODEL_FIELDS = ("guidance_embedding", "dropout")


def state_sections(config) -> tuple:
  """The denoiser's state sections and the `distill` section (teacher, step, w range)."""
  return denoiser.state_sections(config) + ("distill",)


def teacher_checkpoints(config) -> str:
  return paths.diffusion_checkpoints(config.distill.teacher_workdir)


def resolve_teacher(config):
  """`config` with `distill.teacher_step` set (None: the teacher's latest step, recorded so
  that a resumed run is checked against the teacher it started from), after checking that
  the teacher can teach this student; a missing or mismatched teacher is a one-line
  CheckpointError."""
  directory = teacher_checkpoints(config)
  step = config.distill.teacher_step
  check_teacher(checkpoints.read_config(directory, step), config.to_dict(), directory)
  config = config.copy_and_resolve_references()
  config.distill.teacher_step = checkpoints.latest_step(directory) if step is None else step
  return config


def check_teacher(teacher: dict, student: dict, directory: str) -> None:
  """Raises CheckpointError unless the teacher's saved config `teacher` shares
  TEACHER_SECTIONS with the student's config `student` and has an unconditional pass."""
  if teacher["model"].get("guidance_embedding", False):
    raise checkpoints.CheckpointError(f"The teacher in {directory} is itself a guidance-distilled "
                                      "student; distill a model trained with configs/digits.py.")

  def network(config):
    return {k: v for k, v in config["model"].items() if k not in STUDENT_ONLY_MODEL_FIELDS}

  diffs = checkpoints.config_differences({**teacher, "model": network(teacher)},
                                         {**student, "model": network(student)}, TEACHER_SECTIONS)
  if diffs:
    raise checkpoints.CheckpointError(
        f"The teacher in {directory} does not match this student ({'; '.join(diffs)}); the "
        "student is the teacher's UNet on its data set and schedule: set those fields to the "
        "teacher's.")
  if not teacher["diffusion"].get("p_uncond", 0) > 0:
    raise checkpoints.CheckpointError(f"The teacher in {directory} was trained without "
                                      "conditioning dropout (diffusion.p_uncond=0), so it has "
                                      "no unconditional ε to guide with.")


def load_teacher(config):
  """(graphdef, EMA parameters) of the teacher at `distill.teacher_step`."""
  directory = teacher_checkpoints(config)
  step = config.distill.teacher_step
  teacher_config = ml_collections.ConfigDict(checkpoints.read_config(directory, step))
  graphdef, abstract_params = models.abstract(*models.denoiser(teacher_config))
  return graphdef, checkpoints.restore_subtree(directory, "ema_params", abstract_params, step)


def init_student(config, teacher_params, seed):
  """(graphdef, params) of the student: the teacher's parameters, and the fresh w-embedding
  (its zero output layer leaves the student the teacher's conditional model)."""
  graphdef, params = models.create(*models.denoiser(config), seed=seed)
  return graphdef, {**params, **teacher_params}


def guided_target(teacher_eps_fn, x_t, t, y, w, null_label):
  """The teacher's ε̂ = ε_u + w·(ε_c − ε_u) per example (Ho & Salimans eq. (6), as
  `guidance.CFG.combine`), its two passes as one batched 2B call."""
  eps_c, eps_u, _ = guided.both_passes(teacher_eps_fn, x_t, t, y, jnp.full_like(y, null_label))
  return eps_u + diffusion.per_example(w, eps_c) * (eps_c - eps_u)


def distillation_loss(params, student_apply, teacher_eps_fn, schedule: schedules.Schedule, x0,
                      labels, key, *, guidance_scale_range, p_uncond: float, null_label: int,
                      min_snr_gamma: Optional[float] = None):
  """Meng et al.'s stage-1 loss: ‖ε_s(x_t, t, y, w) − ε̂_teacher(x_t, t, y, w)‖², averaged;
  with `min_snr_gamma`, each example weighted by min-SNR-γ as in `diffusion.cfg_loss`.

  Draws t ~ U{0..T-1}, ε ~ N(0, I), w ~ U[guidance_scale_range] and the label drop from
  `key`. The target is a deterministic function of (x_t, t, y, w), so a student equal to the
  guided teacher has loss 0.

  Args:
    student_apply: `student_apply(params, x_t, t, y, w) -> ε`.
    teacher_eps_fn: `teacher_eps_fn(x_t, t, y) -> ε`; y == null_label is ε_u.

  Returns:
    (loss, aux): the mean squared error, and a dict with the per-example loss, t, w and the
    dropped-label mask.
  """
  t_key, noise_key, w_key, drop_key = jax.random.split(key, 4)
  batch = x0.shape[0]
  t = jax.random.randint(t_key, (batch,), 0, schedule.num_timesteps)
  noise = jax.random.normal(noise_key, x0.shape, x0.dtype)
  low, high = guidance_scale_range
  w = jax.random.uniform(w_key, (batch,), jnp.float32, low, high)
  y, dropped = diffusion.drop_labels(drop_key, labels, p_uncond, null_label)
  x_t = diffusion.q_sample(schedule, x0, t, noise)
  target = guided_target(teacher_eps_fn, x_t, t, y, w, null_label)
  eps = student_apply(params, x_t, t, y, w)
  chex.assert_equal_shape([eps, target])  # a wrong shape would broadcast silently
  loss_per_example = jnp.mean(jnp.square(eps - target).reshape(batch, -1), axis=-1)
  if min_snr_gamma is not None:
    loss_per_example = loss_per_example * diffusion.min_snr_weight(schedule, t, min_snr_gamma)
  return jnp.mean(loss_per_example), {"per_example_loss": loss_per_example, "t": t, "w": w,
                                      "dropped": dropped}


def make_loss_fn(graphdef, teacher_eps_fn, schedule: schedules.Schedule, config) -> loop.LossFn:
  """`loss_fn(params, batch, key)`: the distillation loss of the student, with dropout,
  computed in `config.train.dtype` (float32 weights either way)."""
  null_label = data.spec(config.data.name).num_classes
  compute_dtype = config.train.get("dtype", "float32")
  guidance_scale_range = tuple(config.distill.guidance_scale_range)

  def loss_fn(params, batch, key):
    loss_key, dropout_key = jax.random.split(key)

    def student_apply(params, x_t, t, y, w):
      return models.apply_in_dtype(graphdef, params, x_t, t, y, w, dtype=compute_dtype,
                                   dropout_key=dropout_key)

    loss, _ = distillation_loss(params, student_apply, teacher_eps_fn, schedule, batch["image"],
                                batch["label"], loss_key,
                                guidance_scale_range=guidance_scale_range,
                                p_uncond=config.diffusion.p_uncond, null_label=null_label,
                                min_snr_gamma=denoiser.min_snr_gamma(config))
    return loss, {}

  return loss_fn


def train(config, workdir: str, train_split: data.Split, mesh=None):
  """Distils (or resumes distilling) the teacher of `config` (after `resolve_teacher`) into a
  student; returns (graphdef, final TrainState)."""
  mesh = mesh or distributed.data_mesh()
  teacher_graphdef, teacher_params = load_teacher(config)
  graphdef, params = init_student(config, teacher_params, loop.key_streams(config.seed).init)
  # Replicated like the state, since the train step closes over them.
  teacher_eps_fn = Partial(models.apply_in_dtype, teacher_graphdef,
                           distributed.replicate_tree(teacher_params, mesh),
                           dtype=config.train.get("dtype", "float32"))
  loss_fn = make_loss_fn(graphdef, teacher_eps_fn, schedules.from_config(config.diffusion),
                         config)
  return graphdef, denoiser.fit(config, workdir, train_split, description="distillation",
                                loss_fn=loss_fn, params=params,
                                state_sections=state_sections(config), mesh=mesh)
