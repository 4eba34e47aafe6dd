"""The command-line tools on the tiny config: train, resume, sample, evaluate, sweep (their
bad inputs are tests/test_bad_inputs.py's)."""

import json
import os
import shutil

import numpy as np
import pytest

from tests.helpers import TINY_CONFIG, assert_one_line_error, run_cli as run

TINY = ["--config", TINY_CONFIG]
pytestmark = pytest.mark.slow  # trains the tiny config through the CLI


@pytest.fixture(scope="module")
def workdir(tiny_workdir):
  return tiny_workdir


def test_training_writes_checkpoints_metrics_and_grids(workdir):
  assert {"2", "4"} <= set(os.listdir(workdir / "checkpoints"))
  assert os.listdir(workdir / "classifier")
  assert (workdir / "samples_cfg_3.png").exists()
  assert (workdir / "samples_classifier_1.png").exists()
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert any("diffusion/loss" in l for l in lines)
  assert any("classifier/accuracy" in l for l in lines)
  assert any("classifier/accuracy_q3" in l for l in lines)
  assert any("classifier/test_accuracy_q3" in l for l in lines)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))


def _files(folder):
  """{relative path: (size, mtime)} of every file under `folder`."""
  return {os.path.relpath(os.path.join(root, name), folder):
          (os.stat(os.path.join(root, name)).st_size,
           os.stat(os.path.join(root, name)).st_mtime_ns)
          for root, _, names in os.walk(folder) for name in names}


def test_resume_and_contradicting_config(tiny_workdir, tmp_path):
  """What the README promises of a re-run: checkpoints resumed, never rewritten; the sample
  grids rewritten from the final model. (On a copy: the other tests read the shared run.)"""
  workdir = tmp_path / "run"
  shutil.copytree(tiny_workdir, workdir)  # with the mtimes the test compares
  before = _files(workdir)
  result = run("train.py", *TINY, "--workdir", workdir, "--config.train.num_steps=6",
               "--config.classifier.num_steps=0")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Resuming diffusion from step 4" in result.stderr
  assert "6" in os.listdir(workdir / "checkpoints")
  after = _files(workdir)
  for step in ("2", "4"):
    kept = {k: v for k, v in before.items() if k.startswith(os.path.join("checkpoints", step))}
    assert kept and all(after[k] == v for k, v in kept.items()), step
  assert after["samples_cfg_3.png"][1] > before["samples_cfg_3.png"][1]  # the step-6 model's
  before = sorted(os.listdir(workdir / "checkpoints"))
  result = run("train.py", *TINY, "--workdir", workdir, "--config.model.base_channels=16")
  assert_one_line_error(result, "model.base_channels: saved 8, now 16")
  assert sorted(os.listdir(workdir / "checkpoints")) == before


def test_sample_cli_writes_the_evaluator_layout_deterministically(workdir, tmp_path):
  out = tmp_path / "s.npz"
  args = ["sample.py", "--workdir", workdir, "--out", out, "--num_samples", 12, "--num_steps", 4,
          "--batch_size", 8, "--guidance_scale", 2]
  result = run(*args)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out) as f:
    images, labels = f["arr_0"], f["arr_1"]
  assert images.shape == (12, 8, 8, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, np.arange(12) % 10)
  assert (tmp_path / "s.png").exists()
  # The same seed gives the same samples (and --overwrite replaces the file).
  assert run(*args, "--overwrite").returncode == 0
  with np.load(out) as f:
    np.testing.assert_array_equal(f["arr_0"], images)
  guided = run("sample.py", "--workdir", workdir, "--out", tmp_path / "cg.npz", "--num_samples",
               4, "--num_steps", 4, "--guidance_scale", 0, "--classifier_scale", 2,
               "--labels", "7")
  assert guided.returncode == 0, guided.stderr[-3000:]
  with np.load(tmp_path / "cg.npz") as f:
    np.testing.assert_array_equal(f["arr_1"], [7, 7, 7, 7])


def test_evaluate_and_sweep(workdir, tmp_path):
  from cfg_jax import paths
  from cfg_jax.app import sweep_job
  from cfg_jax.evaluation import evalnet

  evalnet_dir = str(tmp_path / "evalnet")
  net = evalnet.load_or_train("digits", evalnet_dir, num_steps=60)
  assert 0.5 < net.test_accuracy <= 1.0
  assert evalnet.load_or_train("digits", evalnet_dir).test_accuracy == net.test_accuracy
  rows = sweep_job.run_sweep(workdir=str(workdir), guidance_scales=(0.0, 3.0),
                         classifier_scales=(1.0,), num_samples=20, num_steps=4,
                         out_dir=str(tmp_path / "sweep"), evalnet_dir=evalnet_dir)
  assert [(r["guidance"], r["scale"]) for r in rows] == [
      ("classifier-free", 0.0), ("classifier-free", 3.0), ("classifier", 1.0)]
  for name in paths.SWEEP_FILES:
    assert (tmp_path / "sweep" / name).exists()
  with pytest.raises(FileExistsError):
    sweep_job.run_sweep(workdir=str(workdir), guidance_scales=(1.0,), out_dir=str(tmp_path / "sweep"))
  # evaluate.py scores any .npz in the evaluator's layout.
  samples = tmp_path / "real.npz"
  from cfg_jax import data, images

  test = data.load_split("digits", "test")
  np.savez(samples, arr_0=images.to_uint8(test.images[:100]), arr_1=test.labels[:100])
  result = run("evaluate.py", "--samples", samples, "--evalnet_dir", evalnet_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  scores = json.load(open(tmp_path / "real.eval.json"))
  assert scores["accuracy"] == pytest.approx(net.test_accuracy, abs=0.1)


def test_a_model_trained_without_dropout_is_guided_by_icg(tmp_path):
  """p_uncond = 0 trains no null label: the grids guide by ICG, and plain CFG is the one-line
  error that names ICG."""
  work = tmp_path / "nodrop"
  result = run("train.py", *TINY, "--workdir", work, "--config.diffusion.p_uncond=0.0",
               "--config.train.num_steps=2")
  assert result.returncode == 0, result.stderr
  assert "independent condition guidance" in result.stderr
  assert (work / "samples_cfg_3.png").exists() and (work / "samples_classifier_1.png").exists()
  # The grids sampled ICG (sample.py --guidance icg is tested on the shared tiny workdir).
  result = run("sample.py", "--workdir", work, "--num_steps", "2", "--num_samples", "4",
               "--guidance_scale", "3", "--out", tmp_path / "cfg.npz")
  assert_one_line_error(result, "IndependentCondition")
  assert not (tmp_path / "cfg.npz").exists()
