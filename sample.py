"""Samples a trained model to an .npz (guided-diffusion's layout) and a PNG grid.

  python sample.py --workdir runs/digits --out samples.npz --guidance_scale 3
  python sample.py --workdir runs/digits --out cg.npz --guidance_scale 0 --classifier_scale 4
  python sample.py --workdir runs/digits --guidance_scale 3 --interval 0.28,5.42 --rescale 0.7
  python sample.py --workdir runs/digits --guidance apg --guidance_scale 4 --apg_momentum -0.5
  python sample.py --workdir runs/digits --guidance autoguidance --guidance_scale 2 \
      --weak_step 500 --method dpmpp_2m --num_steps 15 --timestep_spacing trailing
  python sample.py --workdir runs/adm64 --labels "Pembroke Welsh corgi" --classifier_scale 10
"""

from absl import app, flags

from cfg_jax.app import command_flags, startup

_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "Training workdir to load.")
_OUT = flags.DEFINE_string("out", "samples.npz", "Output .npz (a .png grid goes beside it).")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 100, "How many images.")
_LABELS = flags.DEFINE_string("labels", None, "Comma-separated class ids, cycled to "
                              "num_samples; default: balanced over all classes.")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "The --guidance rule's scale; for cfg "
                               "γ (0 unconditional, 1 conditional; Ho & Salimans' w = γ − 1). "
                               "Default 3 (cfg, apg), 0.6 (cfgpp), 2 (autoguidance).")
command_flags.define_sampler_flags()
_ETA = flags.DEFINE_float("eta", 0.0, "DDIM η (0 deterministic).")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Images per compiled sampler call.")
_CLS_SCALE = flags.DEFINE_float("classifier_scale", None, "Classifier-guidance scale s; default: "
                                 "the model's (0 for digits, the preset's for a converted ADM).")
_CLS_WORKDIR = flags.DEFINE_string("classifier_workdir", None, "Workdir of the noisy "
                                   "classifier; default: --workdir.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")


def main(argv):
  startup.start(argv)
  from cfg_jax import distributed
  from cfg_jax.app import sample_job

  npz, png = startup.run_or_exit(lambda: sample_job.sample_to_npz(
      workdir=_WORKDIR.value, out=_OUT.value, num_samples=_NUM_SAMPLES.value,
      labels=command_flags.parse_labels(_LABELS.value),
      rule=dict(guidance_scale=_GUIDANCE.value, **command_flags.rule_keywords()),
      **command_flags.sampler_keywords(), eta=_ETA.value, seed=_SEED.value,
      batch_size=_BATCH.value,
      classifier_scale=_CLS_SCALE.value, classifier_workdir=_CLS_WORKDIR.value,
      overwrite=_OVERWRITE.value))
  if distributed.is_main():
    print(f"Wrote {npz} and {png}")


if __name__ == "__main__":
  app.run(main, flags_parser=startup.parse_flags_or_exit)
