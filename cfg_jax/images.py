"""Conversions between model images in [−1, 1] and uint8 pictures, and PNG grids."""

from __future__ import annotations

import numpy as np


def to_uint8(images) -> np.ndarray:
  """[−1, 1] floats → uint8 0..255, as guided-diffusion's sampler writes them."""
  images = np.asarray(images, np.float32)
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


def save_grid(path: str, images: np.ndarray, num_rows: int, scale: int = 4) -> None:
  """Writes a PNG grid, each pixel scaled up `scale`× so small images stay visible."""
  from PIL import Image

  picture = grid(images, num_rows)
  picture = picture.repeat(scale, axis=0).repeat(scale, axis=1)
  Image.fromarray(picture[..., 0] if picture.shape[-1] == 1 else picture).save(path)
