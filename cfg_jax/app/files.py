"""Files a person or another tool reads: PNG grids and `.npz` sample sets in guided-diffusion's
evaluator layout (`arr_0` uint8 NHWC images, `arr_1` labels).

Every write goes to a temporary file in the target folder and is renamed into place, so a
failure never leaves a half-written file, and nothing existing is replaced unless asked.
"""

from __future__ import annotations

import os

import numpy as np

from cfg_jax import errors, images, paths
from cfg_jax.sampling.checks import check_labels

# A PNG grid shows at most this many samples: 50k samples would make a 2.6 GB picture.
MAX_GRID_IMAGES = 100


def check_output_free(path: str, overwrite: bool) -> None:
  """Raises unless `path` can be written: absent (or `overwrite`) and in a usable folder.

  Checked before any long work, so a bad output path never fails after it.
  """
  if os.path.isdir(path):
    raise paths.UnusablePathError(f"{path} is a folder; choose another output path.")
  if os.path.exists(path) and not overwrite:
    raise errors.OutputExistsError(f"{path} exists; pass --overwrite to replace it or choose "
                                   "another output path.")
  paths.check_folder_usable(os.path.dirname(os.path.abspath(path)), what=path)


def save_grid(path: str, samples: np.ndarray, num_rows: int, scale: int = 4) -> str:
  """Writes a PNG grid, each pixel scaled up `scale`× so small images stay visible."""
  from PIL import Image

  picture = images.grid(samples, num_rows)
  picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
  with paths.atomic_path(path, ".png") as tmp:
    Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(tmp, "PNG")
  return path


def write_npz(path: str, samples: np.ndarray, labels: np.ndarray, overwrite: bool = False) -> str:
  check_output_free(path, overwrite)
  with paths.atomic_path(path, ".npz") as tmp:
    np.savez(tmp, arr_0=samples, arr_1=np.asarray(labels))
  return path


def grid_path_beside(npz_path: str) -> str:
  return os.path.splitext(npz_path)[0] + ".png"


def save_grid_beside(npz_path: str, samples: np.ndarray, labels: np.ndarray) -> str:
  """A PNG next to the .npz: the first `MAX_GRID_IMAGES` samples, sorted by label."""
  samples, labels = samples[:MAX_GRID_IMAGES], np.asarray(labels)[:MAX_GRID_IMAGES]
  order = np.argsort(labels, kind="stable")
  return save_grid(grid_path_beside(npz_path), samples[order],
                   num_rows=int(np.ceil(np.sqrt(len(labels)))))


def read_npz(path: str, image_shape=None, num_classes=None):
  """(uint8 NHWC images, int64 labels) from a guided-diffusion-style .npz, checked.

  Float images, NaN, a missing array, mismatched lengths, another image shape
  (`image_shape`) or labels outside 0..num_classes−1 raise an `InputError`.
  """
  if not os.path.isfile(path):
    raise errors.MissingFileError(f"No sample file {path}; write one with sample.py first.")
  layout = "arr_0 (uint8 NHWC images) and arr_1 (integer labels)"
  try:
    with np.load(path, allow_pickle=False) as f:
      samples, labels = f["arr_0"], f["arr_1"]
  except (KeyError, ValueError, OSError, EOFError) as e:
    raise errors.InputError(f"{path} is not an .npz with {layout} ({type(e).__name__}).") from None
  if samples.dtype != np.uint8:
    raise errors.InputError(f"{path}: arr_0 must be uint8 images 0..255, got {samples.dtype}; "
                            "convert with cfg_jax.images.to_uint8 (from [-1, 1]).")
  if samples.ndim != 4 or labels.ndim != 1 or len(samples) != len(labels):
    raise errors.InputError(f"{path}: arr_0 must be NHWC with one label per image in arr_1, "
                            f"got {samples.shape} and {labels.shape}.")
  if image_shape is not None and samples.shape[1:] != tuple(image_shape):
    raise errors.InputError(f"{path}: images have shape {samples.shape[1:]}, but this data "
                            f"set's are {tuple(image_shape)}; pass the right --dataset.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise errors.InputError(f"{path}: arr_1 must hold integer labels, got {labels.dtype}.")
  labels = labels.astype(np.int64)
  try:
    check_labels(labels, null_label=None, num_classes=num_classes)
  except errors.InputError as e:
    raise errors.InputError(f"{path}: {e}") from None
  return samples, labels
