"""Drawing many samples from a trained model in fixed-size batches, and writing them as
guided-diffusion's evaluator reads them (`arr_0` uint8 NHWC images, `arr_1` labels)."""

from __future__ import annotations

import os
import tempfile
from typing import Optional, Sequence

import jax
import numpy as np

from cfg_jax import classifier, data, images, sampling, schedules, trainer


def parse_labels(text: Optional[str], num_samples: int, num_classes: int) -> np.ndarray:
  """"3,5" → 3,5,3,5,… (num_samples of them); None → balanced over all classes."""
  if text is None or text == "":
    return np.arange(num_samples) % num_classes
  try:
    given = np.array([int(v) for v in text.split(",")])
  except ValueError:
    raise ValueError(f"--labels must be comma-separated integers, got {text!r}.") from None
  bad = given[(given < 0) | (given >= num_classes)]
  if bad.size:
    raise ValueError(f"label {bad[0]} is out of range; this model's classes are "
                     f"0..{num_classes - 1}.")
  return np.resize(given, num_samples)


def generate(key, eps_fn, schedule: schedules.Schedule, labels: Sequence[int], *,
             image_shape, num_classes: int, batch_size: int = 256, progress: bool = False,
             **sample_kwargs) -> np.ndarray:
  """Samples one image per label in batches of `batch_size`; uint8 NHWC.

  The last batch is padded to full size so every batch reuses one compiled sampler.
  """
  from tqdm.auto import tqdm

  labels = np.asarray(labels, np.int32)
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  out = []
  starts = range(0, len(labels), batch_size)
  for i, start in enumerate(tqdm(starts, desc="sampling", unit="batch", disable=not progress)):
    chunk = labels[start:start + batch_size]
    padded = np.resize(chunk, min(batch_size, len(labels)))
    x = sampling.sample(jax.random.fold_in(key, i), eps_fn, schedule, padded,
                        image_shape=image_shape, null_label=num_classes, **sample_kwargs)
    out.append(images.to_uint8(x)[:len(chunk)])
  return np.concatenate(out) if out else np.zeros((0, *image_shape), np.uint8)


def check_output_free(path: str, overwrite: bool) -> None:
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass --overwrite to replace it or choose another --out.")


def write_npz(path: str, samples: np.ndarray, labels: np.ndarray, overwrite: bool = False) -> str:
  """Writes atomically (temp file + rename): a failure never leaves a half-written file."""
  check_output_free(path, overwrite)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
  os.close(fd)
  try:
    np.savez(tmp, arr_0=samples, arr_1=np.asarray(labels))
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def write_grid_beside(npz_path: str, samples: np.ndarray, labels: np.ndarray) -> str:
  """A PNG next to the .npz, images sorted by label."""
  order = np.argsort(labels, kind="stable")
  path = os.path.splitext(npz_path)[0] + ".png"
  images.save_grid(path, samples[order], num_rows=int(np.ceil(np.sqrt(len(labels)))))
  return path


def read_npz(path: str):
  """(uint8 NHWC images, labels) from a guided-diffusion-style .npz."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"No sample file {path}; write one with sample.py first.")
  try:
    with np.load(path) as f:
      samples, labels = f["arr_0"], f["arr_1"]
  except (KeyError, ValueError, OSError) as e:
    raise ValueError(f"{path} is not an .npz with arr_0 (uint8 NHWC images) and arr_1 "
                     f"(labels) ({type(e).__name__}).") from None
  if samples.ndim != 4 or len(samples) != len(labels):
    raise ValueError(f"{path}: arr_0 must be NHWC with one label per image in arr_1, got "
                     f"{samples.shape} and {labels.shape}.")
  return samples, labels.astype(np.int64)


def sample_to_npz(*, workdir: str, out: str, num_samples: int, labels: Optional[str] = None,
                  guidance_scale: float = 3.0, method: str = "ddim", num_steps: int = 50,
                  eta: float = 0.0, seed: int = 0, batch_size: int = 256,
                  classifier_scale: float = 0.0, classifier_workdir: Optional[str] = None,
                  overwrite: bool = False) -> tuple[str, str]:
  """What `sample.py` does: load the EMA model, sample, write the .npz and a PNG grid."""
  if num_samples < 1:
    raise ValueError(f"--num_samples must be positive, got {num_samples}.")
  check_output_free(out, overwrite)
  eps_fn, config = trainer.load_diffusion(workdir)
  spec = data.spec(config.data.name)
  label_array = parse_labels(labels, num_samples, spec.num_classes)
  classifier_fn = None
  if classifier_scale != 0:
    classifier_fn, _ = classifier.load_classifier(classifier_workdir or workdir)
  samples = generate(jax.random.key(seed), eps_fn, schedules.from_config(config.diffusion),
                     label_array, image_shape=spec.image_shape, num_classes=spec.num_classes,
                     batch_size=batch_size, progress=True, method=method, num_steps=num_steps,
                     eta=eta, guidance_scale=guidance_scale, classifier_fn=classifier_fn,
                     classifier_scale=classifier_scale)
  npz = write_npz(out, samples, label_array, overwrite)
  return npz, write_grid_beside(npz, samples, label_array)
