"""Scores an .npz of samples (guided-diffusion's layout: arr_0 uint8 NHWC, arr_1 labels).

  python evaluate.py --samples samples.npz                # digits evaluation network
  python evaluate.py --samples other_tool.npz --dataset digits --json scores.json

Prints a table and writes JSON (default: beside the samples, NAME.eval.json).
"""

import json
import os

from absl import app, flags

from cfg_jax import cli

_SAMPLES = flags.DEFINE_string("samples", "samples.npz", "The .npz to score.")
_DATASET = flags.DEFINE_string("dataset", "digits", "Data set the samples imitate.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir (default ~/tensorflow_datasets).")
_EVALNET = flags.DEFINE_string("evalnet_dir", None, "Evaluation network; trained there if "
                               "absent (default ~/.cache/cfg_jax/evalnet/DATASET).")
_JSON = flags.DEFINE_string("json", None, "Output JSON; default SAMPLES.eval.json.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing --json.")


def main(argv):
  cli.start(argv)

  def run():
    from cfg_jax import data, io
    from cfg_jax.evaluation import check_samples, evalnet, evaluate, format_table

    out = _JSON.value or os.path.splitext(_SAMPLES.value)[0] + ".eval.json"
    io.check_output_free(out, _OVERWRITE.value)
    spec = data.spec(_DATASET.value)
    samples, labels = io.read_npz(_SAMPLES.value, spec.image_shape, spec.num_classes)
    check_samples(samples, labels)
    net = evalnet.load_or_train(_DATASET.value, _EVALNET.value, _DATA_DIR.value)
    splits = [data.load_split(_DATASET.value, s, _DATA_DIR.value) for s in ("test", "train")]
    scores = {"samples": _SAMPLES.value, "evalnet_test_accuracy": net.test_accuracy,
              **evaluate(samples, labels, net, *splits)}
    with io.atomic_path(out, ".json") as tmp, open(tmp, "w") as f:
      json.dump(scores, f, indent=2)
    print(format_table([{"name": os.path.basename(_SAMPLES.value), **scores}]))
    print(f"Wrote {out}")

  cli.run_or_exit(run)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_or_exit)
