"""Files a person or another tool reads: uint8 pictures, PNG grids and `.npz` sample sets in
guided-diffusion's evaluator layout (`arr_0` uint8 NHWC images, `arr_1` labels).

Every write goes to a temporary file in the target folder and is renamed into place, so a
failure never leaves a half-written file, and nothing existing is replaced unless asked.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import numpy as np

from cfg_jax import errors

# A PNG grid shows at most this many samples: 50k samples would make a 2.6 GB picture.
MAX_GRID_IMAGES = 100


def user_cache_dir() -> str:
  """Where the project keeps what it can rebuild (the evaluation network, compiled
  programs): $XDG_CACHE_HOME/cfg_jax, by default ~/.cache/cfg_jax."""
  cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(cache, "cfg_jax")


def to_uint8(images) -> np.ndarray:
  """[−1, 1] floats → uint8 0..255, as guided-diffusion's sampler writes them.

  NaN would silently become black pixels, so non-finite values raise instead.
  """
  images = np.asarray(images, np.float32)
  if not np.isfinite(images).all():
    bad = int(np.sum((~np.isfinite(images)).reshape(len(images), -1).any(-1))) if images.ndim else 1
    raise errors.NonFiniteError(
        f"{bad} of {len(images) if images.ndim else 1} images hold NaN or infinite values; the "
        "model may have diverged (retrain with a lower learning rate) or a label is out of range.")
  return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images) -> np.ndarray:
  return np.asarray(images, np.float32) / 127.5 - 1.0


def grid(images: np.ndarray, num_rows: int, pad: int = 1) -> np.ndarray:
  """(N, H, W, C) uint8 → one (rows·(H+pad)+pad, cols·(W+pad)+pad, C) image, row-major."""
  n, h, w, c = images.shape
  cols = -(-n // num_rows)
  out = np.full((num_rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, image in enumerate(images):
    top, left = (pad + k * (size + pad) for k, size in zip(divmod(i, cols), (h, w)))
    out[top:top + h, left:left + w] = image
  return out


class UnusablePathError(errors.UserError):
  """An output path that cannot be written: a file where a folder must be, or no permission."""


def check_output_free(path: str, overwrite: bool) -> None:
  """Raises unless `path` can be written: absent (or `overwrite`) and in a usable folder.

  Checked before any long work, so a bad output path never fails after it.
  """
  if os.path.isdir(path):
    raise UnusablePathError(f"{path} is a folder; choose another output path.")
  if os.path.exists(path) and not overwrite:
    raise errors.OutputExistsError(f"{path} exists; pass --overwrite to replace it or choose "
                                   "another output path.")
  check_folder_usable(os.path.dirname(os.path.abspath(path)), what=path)


def check_folder_usable(folder: str, what: str, fix: str = "choose another output path") -> None:
  """Raises `UnusablePathError` ("cannot write `what`: ...; `fix`.") unless `folder` is a
  writable folder or could be made one.

  Creates nothing: a folder made now would outlive a run that fails before writing to it.
  """
  existing = os.path.abspath(folder)
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise UnusablePathError(f"cannot write {what}: {existing} is not a folder; {fix}.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UnusablePathError(f"cannot write {what}: {existing} is not writable; {fix}.")


def make_folder(folder: str, fix: str = "choose another output path") -> None:
  """`os.makedirs(folder, exist_ok=True)`, with a file in the way or a missing permission
  as an `UnusablePathError`."""
  try:
    os.makedirs(folder, exist_ok=True)
  except (FileExistsError, NotADirectoryError, PermissionError) as e:
    raise UnusablePathError(f"cannot create the folder {folder} ({e.strerror}); {fix}.") from None


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = ""):
  """Yields a temporary path beside `path`, renamed onto it if the block succeeds."""
  directory = os.path.dirname(os.path.abspath(path))
  make_folder(directory)
  try:
    fd, tmp = tempfile.mkstemp(suffix=suffix, dir=directory, prefix=".tmp-")
  except PermissionError as e:
    raise UnusablePathError(f"cannot write in {directory} ({e.strerror}); choose another output "
                            "path.") from None
  os.close(fd)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_grid(path: str, images: np.ndarray, num_rows: int, scale: int = 4) -> str:
  """Writes a PNG grid, each pixel scaled up `scale`× so small images stay visible."""
  from PIL import Image

  picture = grid(images, num_rows)
  picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
  with atomic_path(path, ".png") as tmp:
    Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(tmp, "PNG")
  return path


def write_npz(path: str, samples: np.ndarray, labels: np.ndarray, overwrite: bool = False) -> str:
  check_output_free(path, overwrite)
  with atomic_path(path, ".npz") as tmp:
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
                            "convert with cfg_jax.io.to_uint8 (from [-1, 1]).")
  if samples.ndim != 4 or labels.ndim != 1 or len(samples) != len(labels):
    raise errors.InputError(f"{path}: arr_0 must be NHWC with one label per image in arr_1, "
                            f"got {samples.shape} and {labels.shape}.")
  if image_shape is not None and samples.shape[1:] != tuple(image_shape):
    raise errors.InputError(f"{path}: images have shape {samples.shape[1:]}, but this data "
                            f"set's are {tuple(image_shape)}; pass the right --dataset.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise errors.InputError(f"{path}: arr_1 must hold integer labels, got {labels.dtype}.")
  labels = labels.astype(np.int64)
  if num_classes is not None:
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
      raise errors.InputError(f"{path}: label {bad[0]} is out of range; this data set's "
                              f"classes are 0..{num_classes - 1}.")
  return samples, labels
