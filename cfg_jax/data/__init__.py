"""Data sets as in-memory arrays scaled to [−1, 1], read through `tfds.data_source`.

The embedded `digits` set is prepared on first use with no network. TFDS catalog sets
(mnist, fashion_mnist, cifar10) are read from `data_dir` and downloaded only when the
config asks for it (`data.download=True`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
from typing import Iterator, Optional

import numpy as np
from absl import logging

from cfg_jax import errors


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  image_shape: tuple[int, int, int]
  num_classes: int
  max_value: float  # largest raw pixel value; images are scaled by it to [−1, 1]
  embedded: bool = False  # ships inside an installed package: prepared offline


DATASETS = {
    "digits": DatasetSpec((8, 8, 1), 10, 16.0, embedded=True),
    "mnist": DatasetSpec((28, 28, 1), 10, 255.0),
    "fashion_mnist": DatasetSpec((28, 28, 1), 10, 255.0),
    "cifar10": DatasetSpec((32, 32, 3), 10, 255.0),
}


class DatasetError(errors.UserError):
  """A data set that cannot be loaded, with the fix in its message."""


@dataclasses.dataclass(frozen=True)
class Split:
  images: np.ndarray  # float32 (N, H, W, C) in [−1, 1]
  labels: np.ndarray  # int32 (N,)


def spec(name: str) -> DatasetSpec:
  if name not in DATASETS:
    raise DatasetError(f"Unknown data set {name!r}; choose one of {sorted(DATASETS)}.")
  return DATASETS[name]


def default_data_dir() -> str:
  home_default = os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
  return os.environ.get("TFDS_DATA_DIR", home_default)


def load_split(name: str, split: str, data_dir: Optional[str] = None,
               download: bool = False) -> Split:
  """Loads one split into memory, preparing the embedded data set if needed."""
  import tensorflow_datasets as tfds  # heavy import, kept off the library's import path

  dataset = spec(name)
  data_dir = data_dir or default_data_dir()
  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    if not (dataset.embedded or download):
      raise DatasetError(
          f"Data set {name!r} is not prepared in {data_dir}; run once with network and "
          f"--config.data.download=True, or point --config.data.data_dir at a prepared copy.")
    # TFDS prints its preparation banner to stdout; for the embedded set it is only noise.
    chatter = io.StringIO()
    with contextlib.redirect_stdout(chatter if dataset.embedded else sys.stdout):
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    logging.info("Prepared %s in %s. %s", name, data_dir, chatter.getvalue().strip())
  source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  records = source.__getitems__(range(len(source)))
  images = np.stack([np.asarray(r["image"]) for r in records]).astype(np.float32)
  labels = np.asarray([r["label"] for r in records], dtype=np.int32)
  images = images / dataset.max_value * 2.0 - 1.0
  return Split(images.reshape((-1, *dataset.image_shape)), labels)


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
  """Indices of the batch at `step`: a fresh permutation per epoch, a pure function of step.

  Being a function of the step (not of iterator state) makes resumed runs see exactly
  the batches an uninterrupted run would.
  """
  if batch_size > num_examples:
    raise DatasetError(f"batch_size {batch_size} exceeds the {num_examples} training examples.")
  steps_per_epoch = num_examples // batch_size
  epoch, index = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[index * batch_size:(index + 1) * batch_size]


def batches(split: Split, batch_size: int, seed: int, start_step: int = 0) -> Iterator[dict]:
  """Endless training batches {"image", "label"}, starting at `start_step`."""
  step = start_step
  while True:
    idx = batch_indices(step, len(split.labels), batch_size, seed)
    yield {"image": split.images[idx], "label": split.labels[idx]}
    step += 1


def _builder(name, data_dir):
  import tensorflow_datasets as tfds

  if name == "digits":
    from cfg_jax.data.digits import Digits

    return Digits(data_dir=data_dir, file_format="array_record")
  try:
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # TFDS raises several types for a missing builder or module.
    raise DatasetError(f"TFDS could not build {name!r} ({type(e).__name__}: {e}).") from e
