"""Scores an .npz of samples (guided-diffusion's layout: arr_0 uint8 NHWC, arr_1 labels).

  python evaluate.py --samples samples.npz                # digits evaluation network
  python evaluate.py --samples other_tool.npz --dataset digits --json scores.json

Prints a table and writes JSON (default: beside the samples, NAME.eval.json).
"""

from absl import app, flags

from cfg_jax.app import startup

_SAMPLES = flags.DEFINE_string("samples", "samples.npz", "The .npz to score.")
_DATASET = flags.DEFINE_string("dataset", "digits", "Data set the samples imitate.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default ~/tensorflow_datasets).")
_EVALNET = flags.DEFINE_string("evalnet_dir", None, "Evaluation network; trained there if "
                               "absent (default ~/.cache/cfg_jax/evalnet/DATASET).")
_JSON = flags.DEFINE_string("json", None, "Output JSON; default SAMPLES.eval.json.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --json.")


def main(argv):
  startup.start(argv)
  from cfg_jax.app import evaluate_job

  scores, out = startup.run_or_exit(lambda: evaluate_job.evaluate_npz(
      _SAMPLES.value, _DATASET.value, _DATA_DIR.value, _EVALNET.value, _JSON.value,
      _OVERWRITE.value))
  print(evaluate_job.table(scores))
  print(f"Wrote {out}")


if __name__ == "__main__":
  app.run(main, flags_parser=startup.parse_flags_or_exit)
