"""Images between the model's floats in [−1, 1] and uint8 pixels, and sample grids."""

from __future__ import annotations

import numpy as np

from cfg_jax import errors


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
