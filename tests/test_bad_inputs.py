"""A table of bad inputs to the four command-line tools: each must end in one `error:` line
on stderr with exit status 2, and change no file (workdir and inputs hashed before/after)."""

import collections
import hashlib
import os

import numpy as np
import pytest

from tests.helpers import TINY_CONFIG, assert_one_line_error, run_cli

pytestmark = pytest.mark.slow  # ~40 subprocesses and the shared trained workdir

TRAIN = ("train.py", "--config", TINY_CONFIG, "--workdir", "{work}")
SAMPLE = ("sample.py", "--workdir", "{work}", "--num_steps", "2", "--out", "{tmp}/s.npz")
EVALUATE = ("evaluate.py", "--evalnet_dir", "{tmp}/evalnet", "--samples")
SWEEP = ("sweep.py", "--workdir", "{work}", "--out_dir", "{tmp}/sweep", "--num_steps", "2")

CASES = {
    # train.py: the config, checked before any data or compile (each check of a value is
    # tests/test_cli.py's, in process)
    "train num_steps=-1": (TRAIN + ("--config.train.num_steps=-1",),
                           "train.num_steps must be >= 0"),
    "train unknown data set": (TRAIN + ("--config.data.name=nope",), "Unknown data set"),
    "train missing config": (("train.py", "--config", "{tmp}/nope.py", "--workdir", "{work}"),
                             "cannot load the --config file"),
    "train keep_steps text": (TRAIN + ("--config.train.keep_steps=('x',)",), "train.keep_steps"),
    "train stray argument": (TRAIN + ("extra",), "unexpected argument(s) 'extra'"),
    "train workdir is a file": (TRAIN[:-1] + ("{tmp}/existing.npz",), "is not a folder"),
    "train workdir under a file": (TRAIN[:-1] + ("{tmp}/existing.npz/run",), "is not a folder"),
    # The entry points run on 2 host devices (cfg_jax.xla_flags) on any multi-core CPU; a new
    # workdir, so nothing but the device count stops it (and no folder may be left behind).
    "train batch over devices": (TRAIN[:-1] + ("{tmp}/fresh", "--config.train.batch_size=15"),
                                 "must be divisible by the 2 devices"),
    # train.py: contradicting the workdir it would resume
    # (another model is tests/test_end_to_end.py's test_resume_and_contradicting_config)
    "train other seed": (TRAIN + ("--config.seed=1",), "seed: saved 0, now 1"),
    "train other batch": (TRAIN + ("--config.train.batch_size=32",),
                          "train.batch_size: saved 16, now 32"),
    # sample.py
    "sample num_samples=0": (SAMPLE + ("--num_samples", "0"), "--num_samples must be positive"),
    "sample label 10": (SAMPLE + ("--labels", "3,10"), "label 10 is out of range"),
    "sample label text": (SAMPLE + ("--labels", "a,b"), "label 'a' is a name, but this model"),
    "sample num_steps 5000": (SAMPLE + ("--num_steps", "5000"), "num_steps must be an int in"),
    "sample num_steps text": (SAMPLE + ("--num_steps", "many"), "num_steps"),
    "sample existing out": (SAMPLE + ("--out", "{tmp}/existing.npz"), "exists"),
    "sample existing png": (SAMPLE + ("--out", "{tmp}/grid.npz"), "grid.png exists"),
    "sample no workdir": (SAMPLE + ("--workdir", "{tmp}/nothing"), "No checkpoint"),
    "sample batch 0": (SAMPLE + ("--batch_size", "0"), "batch_size must be positive"),
    "sample eta<0": (SAMPLE + ("--eta", "-1"), "eta must be"),
    "sample ddpm eta": (SAMPLE + ("--method", "ddpm", "--eta", "0.5"), "eta applies"),
    "sample nan scale": (SAMPLE + ("--guidance_scale", "nan"), "scale must be a finite"),
    "sample no classifier": (SAMPLE + ("--classifier_workdir", "{tmp}/nothing"), "No checkpoint"),
    "sample out under a file": (SAMPLE + ("--out", "{tmp}/existing.npz/x.npz"), "is not a folder"),
    "sample out is a folder": (SAMPLE + ("--out", "{tmp}/done", "--overwrite"), "is a folder"),
    # evaluate.py
    "evaluate missing": (EVALUATE + ("{tmp}/missing.npz",), "No sample file"),
    "evaluate 2 samples": (EVALUATE + ("{tmp}/two.npz",), "at least 4 samples"),
    "evaluate float images": (EVALUATE + ("{tmp}/float.npz",), "must be uint8"),
    "evaluate label 10": (EVALUATE + ("{tmp}/label10.npz",), "label 10 is out of range"),
    "evaluate no arr_1": (EVALUATE + ("{tmp}/no_labels.npz",), "is not an .npz"),
    "evaluate wrong shape": (EVALUATE + ("{tmp}/mnist_shaped.npz",), "images have shape"),
    "evaluate not npz": (EVALUATE + ("{tmp}/text.npz",), "is not an .npz"),
    "evaluate unknown data set": (EVALUATE + ("{tmp}/ok.npz", "--dataset", "nope"),
                                  "Unknown data set"),
    "evaluate existing json": (EVALUATE + ("{tmp}/ok.npz", "--json", "{tmp}/existing.npz"),
                               "exists"),
    # sweep.py
    "sweep text scale": (SWEEP + ("--guidance_scales=a",), "comma-separated finite numbers"),
    "sweep inf scale": (SWEEP + ("--classifier_scales=inf",), "comma-separated finite numbers"),
    "sweep no scales": (SWEEP + ("--guidance_scales=",), "Give at least one"),
    "sweep 2 samples": (SWEEP + ("--num_samples", "2"), "at least 4"),
    "sweep num_steps 0": (SWEEP + ("--num_steps", "0"), "num_steps must be"),
    "sweep existing out": (SWEEP + ("--out_dir", "{tmp}/done"), "exists"),
    "sweep no workdir": (SWEEP + ("--workdir", "{tmp}/nothing"), "No checkpoint"),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  """A folder of prepared bad inputs (and files that must not be replaced)."""
  tmp = tmp_path_factory.mktemp("bad_inputs")
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
  labels = np.arange(8) % 10
  np.savez(tmp / "ok.npz", arr_0=images, arr_1=labels)
  np.savez(tmp / "two.npz", arr_0=images[:2], arr_1=labels[:2])
  np.savez(tmp / "float.npz", arr_0=images.astype(np.float32) / 255, arr_1=labels)
  np.savez(tmp / "label10.npz", arr_0=images, arr_1=labels + 3)
  np.savez(tmp / "no_labels.npz", arr_0=images)
  np.savez(tmp / "mnist_shaped.npz", arr_0=np.zeros((8, 28, 28, 1), np.uint8), arr_1=labels)
  (tmp / "text.npz").write_text("not an npz")
  (tmp / "existing.npz").write_bytes(b"precious")
  (tmp / "grid.png").write_bytes(b"precious png")
  (tmp / "done").mkdir()
  (tmp / "done" / "sweep.json").write_text("{}")
  return tmp


def _digest(*roots):
  """Every file's hash and mtime, and every folder (a new empty one counts as a change)."""
  out = {}
  for root in roots:
    for folder, _, files in os.walk(root):
      out[folder] = "folder"
      for name in files:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
          out[path] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
  return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_changes_nothing(name, tiny_workdir, inputs,
                                                          monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(inputs / "cache"))  # never the user's cache
  args, text = CASES[name]
  if name == "train batch over devices" and (os.cpu_count() or 1) < 2:
    pytest.skip("one CPU core: the entry points run on one device, which divides any batch")
  args = [a.format(work=tiny_workdir, tmp=inputs) for a in args]
  before = _digest(tiny_workdir, inputs)
  result = run_cli(*args)
  assert_one_line_error(result, text)
  assert _digest(tiny_workdir, inputs) == before


def test_every_tool_has_cases():
  tools = collections.Counter(args[0] for args, _ in CASES.values())
  assert set(tools) == {"train.py", "sample.py", "evaluate.py", "sweep.py"}
  assert min(tools.values()) >= 5, tools
