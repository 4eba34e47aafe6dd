"""Sample quality of a guidance-distilled student against its teacher, paired by x_T.

  python benchmarks/distilled_quality.py --teacher runs/digits --student runs/distilled
  python benchmarks/distilled_quality.py --teacher T --student S --handover 10,25,40

Both models sample the same labels from the same x_T (one key per --seeds value) at every
--guidance_scales γ, and each set is scored on every metric (accuracy, FID, precision,
recall, memorisation). Printed per γ: the teacher's and the student's mean (min–max) over
the x_T seeds, and the paired difference student − teacher. The x_T seeds measure how much
the metrics move with the noise alone, which one sample set per model cannot show; the
paired difference is what the student changes.

--handover K,... samples at the last γ (the first x_T seed) with the teacher for the first K
steps of the workdirs' DDIM and the student after, and the reverse, beside each model alone
through the same loop, to show where along the trajectory a difference arises.
"""

import argparse

import numpy as np

from cfg_jax.app import startup, xla_flags

import machine

METRICS = ("accuracy", "fid", "precision", "recall", "memorization")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--teacher", required=True)
  parser.add_argument("--student", required=True)
  parser.add_argument("--guidance_scales", default="1,1.5,3")
  parser.add_argument("--seeds", default="0,1,2", help="x_T seeds, shared by both models")
  parser.add_argument("--num_samples", type=int, default=1000)
  parser.add_argument("--batch_size", type=int, default=500)
  parser.add_argument("--handover", default="", help="teacher steps before the student")
  parser.add_argument("--errors", action="store_true",
                      help="the student's ε error per step, on the trajectory and on data")
  parser.add_argument("--quick", action="store_true", help="check that it runs (40 samples)")
  args = parser.parse_args()
  if args.quick:
    args.num_samples, args.batch_size, args.seeds, args.handover = 40, 40, "0", "25"
  xla_flags.configure()
  startup.tune_allocator()

  import jax

  import cfg_jax
  from cfg_jax import data, evaluation, sharded_sampling
  from cfg_jax.evaluation import evalnet

  print(machine.describe())
  models = {"teacher": cfg_jax.load(args.teacher), "student": cfg_jax.load(args.student)}
  if not models["student"].guidance_distilled:
    raise SystemExit(f"{args.student} is not a guidance-distilled student.")
  scales = np.array([float(s) for s in args.guidance_scales.split(",")], np.float32)
  seeds = [int(s) for s in args.seeds.split(",")]
  name = models["teacher"].config.data.name
  net = evalnet.load_or_train(name)
  test, train = data.load_split(name, "test"), data.load_split(name, "train")
  labels = np.arange(args.num_samples) % models["teacher"].num_classes

  def score(samples):
    return evaluation.evaluate(samples, labels, net, test, train)

  # scores[model][seed] = one dict of metrics per γ (all γ of a model in one sweep).
  scores = {model_name: {} for model_name in models}
  for seed in seeds:
    for model_name, model in models.items():
      swept = sharded_sampling.sample_batches(jax.random.key(seed), model, labels,
                                              batch_size=args.batch_size, guidance_scale=scales)
      scores[model_name][seed] = [score(samples) for samples in swept]

  print(f"\n{args.num_samples} samples per set; x_T seeds {args.seeds}; mean (min–max)")
  print(f"{'γ':>5s} {'':17s} " + " ".join(f"{m:>20s}" for m in METRICS))
  for g, scale in enumerate(scales):
    rows = {model_name: np.array([[scores[model_name][s][g][m] for m in METRICS]
                                  for s in seeds]) for model_name in models}
    rows["student − teacher"] = rows["student"] - rows["teacher"]
    for row_name, values in rows.items():
      cells = " ".join(f"{v.mean():8.3f} ({v.min():.3f}–{v.max():.3f})" for v in values.T)
      print(f"{scale:5g} {row_name:17s} {cells}")

  if args.handover:
    print(f"\nhand-over at γ = {scales[-1]:g}, x_T seed {seeds[0]}: first model for K steps")
    num_steps = models["teacher"].config.sampling.num_steps
    runs = [(num_steps, "teacher", "student"), (0, "teacher", "student")]  # each alone
    for k in (int(k) for k in args.handover.split(",")):
      runs += [(k, "teacher", "student"), (k, "student", "teacher")]
    for k, first, second in runs:
      samples = handover_samples(jax.random.key(seeds[0]), models[first], models[second], k,
                                 labels, float(scales[-1]))
      values = score(samples)
      label = {0: "student alone", num_steps: "teacher alone"}.get(
          k, f"{first} {k} steps, then {second}")
      print(f"{label:30s} "
            + "  ".join(f"{m} {values[m]:.3f}" for m in METRICS))

  if args.errors:
    for scale in scales:
      rows = np.array(student_errors(jax.random.key(seeds[0]), models["teacher"],
                                     models["student"], train, float(scale)))
      print(f"\nγ = {scale:g}: the student's relative ε error on the teacher's trajectory and "
            f"on data x_t, and α")
      for t, on_trajectory, on_data, alpha in list(rows[::10]) + [rows[-1]]:
        print(f"  t = {int(t):4d}   {on_trajectory:.2e}   {on_data:.2e}   α {alpha:+.3f}")
      print(f"  mean over steps   {rows[:, 1].mean():.2e}   {rows[:, 2].mean():.2e}   "
            f"α {rows[:, 3].mean():+.3f}")
  print(machine.load())


def guided_eps_fn(model, scale):
  """ε̂(x_t, t, y) of `model` at γ = `scale`: a student's one pass, or a teacher's CFG."""
  import jax.numpy as jnp

  from cfg_jax import guidance
  from cfg_jax.sampling import guided

  if model.guidance_distilled:
    return guided.distilled_eps_fn(guidance.Distilled(scale), model.eps_fn, model.null_label)

  def cfg(x_t, t, y):
    eps_c, eps_u, _ = guided.both_passes(model.eps_fn, x_t, t, y,
                                         jnp.full_like(y, model.null_label))
    return eps_u + scale * (eps_c - eps_u)

  return cfg


def ddim_timesteps(model):
  """(t, t_prev) pairs of the workdir's deterministic DDIM (a SystemExit for another)."""
  from cfg_jax.sampling.respacing import timesteps

  section = model.config.sampling
  if section.method != "ddim" or section.eta != 0:
    raise SystemExit("--handover and --errors need the workdirs' sampler to be DDIM, η = 0.")
  ts = timesteps(model.schedule.num_timesteps, section.num_steps, "leading", "ddim")
  return list(zip(ts, np.append(ts[1:], -1)))


def handover_samples(key, first, second, num_first_steps, labels, scale):
  """uint8 samples of the workdirs' deterministic DDIM at `scale` from x_T of `key`, with
  `first` for the first `num_first_steps` steps and `second` after (one model's ε̂ per step:
  the teacher's two-pass CFG, or the student's one pass)."""
  import jax
  import jax.numpy as jnp

  from cfg_jax import images
  from cfg_jax.sampling.ddim import ddim_step

  schedule, batch = first.schedule, len(labels)
  labels = jnp.asarray(labels, jnp.int32)

  @jax.jit
  def step(x_t, t, t_prev, use_first):
    eps = jax.lax.cond(use_first, guided_eps_fn(first, scale), guided_eps_fn(second, scale),
                       x_t, t, labels)
    return ddim_step(schedule, x_t, t, t_prev, eps, None, 0.0, jnp.zeros_like(x_t), True)

  x = jax.random.normal(key, (batch, *first.image_shape), jnp.float32)
  for i, (t, t_prev) in enumerate(ddim_timesteps(first)):
    x = step(x, jnp.full((batch,), t, jnp.int32), jnp.full((batch,), t_prev, jnp.int32),
             i < num_first_steps)
  return images.to_uint8(x)


def student_errors(key, teacher, student, train, scale, batch=500):
  """Per DDIM step t at γ = `scale`: the student's relative error ‖ε_s − ε̂‖² / ‖ε̂‖² against
  the teacher's guided ε̂ on the teacher's own trajectory and on x_t ~ q(x_t | x_0) of
  training images (where the student was trained), and α = ⟨ε_s − ε̂, ε_c − ε_u⟩ /
  ‖ε_c − ε_u‖² (the student acts as the teacher at γ + α along its guidance direction).
  Means over `batch` examples; returns rows (t, trajectory error, data error, α)."""
  import jax
  import jax.numpy as jnp

  from cfg_jax import diffusion
  from cfg_jax.sampling import guided
  from cfg_jax.sampling.ddim import ddim_step

  schedule, null = teacher.schedule, teacher.null_label
  student_eps = guided_eps_fn(student, scale)

  @jax.jit
  def errors(x_t, t, y):
    eps_c, eps_u, _ = guided.both_passes(teacher.eps_fn, x_t, t, y, jnp.full_like(y, null))
    target, direction = eps_u + scale * (eps_c - eps_u), eps_c - eps_u
    miss = student_eps(x_t, t, y) - target

    def dot(a, b):
      return jnp.sum((a * b).reshape(len(a), -1), axis=-1)

    return (jnp.mean(dot(miss, miss) / dot(target, target)),
            jnp.mean(dot(miss, direction) / dot(direction, direction)), target)

  data_key, noise_key = jax.random.split(key)
  x = jax.random.normal(key, (batch, *teacher.image_shape), jnp.float32)
  labels = jnp.arange(batch, dtype=jnp.int32) % teacher.num_classes
  index = jax.random.choice(data_key, len(train), (batch,), replace=False)
  x0_data, y_data = jnp.asarray(train.images)[index], jnp.asarray(train.labels)[index]
  rows = []
  for i, (t, t_prev) in enumerate(ddim_timesteps(teacher)):
    tv = jnp.full((batch,), t, jnp.int32)
    on_trajectory, alpha, target = errors(x, tv, labels)
    noise = jax.random.normal(jax.random.fold_in(noise_key, i), x0_data.shape)
    on_data, _, _ = errors(diffusion.q_sample(schedule, x0_data, tv, noise), tv, y_data)
    rows.append((int(t), float(on_trajectory), float(on_data), float(alpha)))
    x = ddim_step(schedule, x, tv, jnp.full((batch,), t_prev, jnp.int32), target, None, 0.0,
                  jnp.zeros_like(x), True)
  return rows


if __name__ == "__main__":
  main()
