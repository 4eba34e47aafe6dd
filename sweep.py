"""Samples a trained model at several guidance scales and scores each set.

  python sweep.py --workdir runs/digits --guidance_scales 0,0.5,1,1.5,2,3,5
  python sweep.py --workdir runs/digits --guidance_scales= --classifier_scales 0,1,2,4,8
  python sweep.py --workdir runs/digits --guidance apg --apg_momentum -0.5 --guidance_scales 2,4,8
  python sweep.py --workdir runs/digits --guidance autoguidance --weak_step 500 \
      --method dpmpp_2m --num_steps 15 --timestep_spacing trailing

The scales of one rule are sampled together, in one compiled call per batch.

Writes sweep.json, sweep.csv and sweep.png (FID against accuracy and IS, precision
against recall) to --out_dir (default: WORKDIR/sweep).
"""

from absl import app, flags

from cfg_jax.app import command_flags, startup

_WORKDIR = flags.DEFINE_string("workdir", "runs/digits", "Training workdir to load.")
_GUIDANCE = flags.DEFINE_list("guidance_scales", None, "Scales of the --guidance rule (for cfg "
                              "γ); default by rule, for cfg 0,0.5,1,1.5,2,3,5. Empty: none.")
command_flags.define_sampler_flags()
_CLASSIFIER = flags.DEFINE_list("classifier_scales", [], "Classifier-guidance s values "
                                "(uses the workdir's noisy classifier).")
_BASE = flags.DEFINE_float("classifier_base_guidance", 0.0, "γ under classifier guidance "
                           "(0: guide the unconditional model).")
_NUM = flags.DEFINE_integer("num_samples", 1000, "Samples per scale.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed: the same x_T at every scale.")
_BATCH = flags.DEFINE_integer("batch_size", 500, "Images per scale in each compiled sampler "
                             "call (all scales of the rule are sampled together).")
_OUT = flags.DEFINE_string("out_dir", None, "Output folder; default WORKDIR/sweep.")
_EVALNET = flags.DEFINE_string("evalnet_dir", None, "Evaluation network; trained there if "
                               "absent (default ~/.cache/cfg_jax/evalnet/DATASET).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace existing sweep files.")


def main(argv):
  startup.start(argv)
  from cfg_jax import distributed
  from cfg_jax.app import sweep_job

  def run():
    rule = command_flags.rule_keywords()
    scales = (sweep_job.DEFAULT_SCALES[rule["guidance"]] if _GUIDANCE.value is None
              else command_flags.floats(_GUIDANCE.value, "guidance_scales"))
    rows = sweep_job.run_sweep(
        workdir=_WORKDIR.value, guidance_scales=scales, rule=rule,
        **command_flags.sampler_keywords(),
        classifier_scales=command_flags.floats(_CLASSIFIER.value, "classifier_scales"),
        classifier_base_guidance=_BASE.value, num_samples=_NUM.value, seed=_SEED.value,
        batch_size=_BATCH.value, out_dir=_OUT.value, evalnet_dir=_EVALNET.value,
        overwrite=_OVERWRITE.value)
    if distributed.is_main():
      sweep_job.print_rows(rows)

  startup.run_or_exit(run)


if __name__ == "__main__":
  app.run(main, flags_parser=startup.parse_flags_or_exit)
