"""Data sets scaled to [−1, 1], read through `tfds.data_source`: in memory, or streamed.

The embedded `digits` set is prepared on first use with no network. TFDS catalog sets
(mnist, fashion_mnist, cifar10) are read from `data_dir` and downloaded only when the
config asks for it (`data.download=True`).

Small sets are held in memory (`Split`). Larger ones stream (`Stream`, `data.streaming`):
grain reads each batch's records from the ArrayRecord files with read-ahead threads. Both
paths draw the batch at step k from the same indices, `batch_indices(k, ...)`, and each
process reads only its own rows of it, so results do not depend on the path or on the
number of processes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import os
import sys
from typing import Any, Iterator, Optional, Union

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

  def __len__(self) -> int:
    return len(self.labels)


@dataclasses.dataclass(frozen=True)
class Stream:
  """A split left on disk: records are read (and scaled) batch by batch."""

  source: Any  # a `tfds.data_source` split: len() and [i] → {"image", "label"}
  spec: DatasetSpec

  def __len__(self) -> int:
    return len(self.source)


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
  dataset = spec(name)
  source = open_source(name, split, data_dir, download)
  records = source.__getitems__(range(len(source)))
  return Split(*_to_arrays(records, dataset))


def open_split(name: str, split: str, data_dir: Optional[str] = None, download: bool = False,
               streaming: bool = False) -> Union[Split, Stream]:
  """The split in memory, or (with `streaming`) a `Stream` that reads it batch by batch."""
  if not streaming:
    return load_split(name, split, data_dir, download)
  return Stream(open_source(name, split, data_dir, download), spec(name))


def open_source(name: str, split: str, data_dir: Optional[str] = None,
                download: bool = False):
  """`tfds.data_source` of a prepared split (preparing the embedded set if needed)."""
  import tensorflow_datasets as tfds  # heavy import, kept off the library's import path

  dataset = spec(name)
  data_dir = data_dir or default_data_dir()
  from cfg_jax import distributed

  # One process prepares while the others wait: they share data_dir on one machine, and
  # two writers of the same files would race.
  if distributed.is_main():
    _prepare(name, data_dir, dataset, download)
  distributed.barrier(f"prepared {name}")
  if not distributed.is_main():
    _prepare(name, data_dir, dataset, download)  # per-host disks: each prepares its own
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def _prepare(name: str, data_dir: str, dataset: DatasetSpec, download: bool) -> None:
  import tensorflow_datasets as tfds

  builder = _builder(name, data_dir)
  if builder.is_prepared():
    return
  if not (dataset.embedded or download):
    raise DatasetError(
        f"Data set {name!r} is not prepared in {data_dir}; run once with network and "
        f"--config.data.download=True, or point --config.data.data_dir at a prepared copy.")
  # TFDS prints its preparation banner to stdout; for the embedded set it is only noise.
  chatter = io.StringIO()
  try:
    with contextlib.redirect_stdout(chatter if dataset.embedded else sys.stdout):
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except ImportError as e:
    # TFDS encodes Image features with TensorFlow; reading them back needs only PIL.
    raise DatasetError(
        f"Preparing {name!r} needs TensorFlow (TFDS encodes its images with it): "
        f"`pip install tensorflow-cpu`, prepare once, then train without it "
        f"({type(e).__name__}: {str(e).splitlines()[0][:120]}).") from e
  logging.info("Prepared %s in %s. %s", name, data_dir, chatter.getvalue().strip())


def _to_arrays(records, dataset: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
  """Decoded records → (float32 images in [−1, 1], int32 labels)."""
  images = np.stack([np.asarray(r["image"]) for r in records]).astype(np.float32)
  labels = np.asarray([r["label"] for r in records], dtype=np.int32)
  images = images / dataset.max_value * 2.0 - 1.0
  return images.reshape((-1, *dataset.image_shape)), labels


def batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
  """Indices of the batch at `step`: a fresh permutation per epoch, a pure function of step.

  Being a function of the step (not of iterator state) makes resumed runs see exactly
  the batches an uninterrupted run would.
  """
  if batch_size > num_examples:
    raise DatasetError(f"batch_size {batch_size} exceeds the {num_examples} training examples.")
  steps_per_epoch = num_examples // batch_size
  epoch, index = divmod(step, steps_per_epoch)
  order = _permutation(seed, epoch, num_examples)
  return order[index * batch_size:(index + 1) * batch_size]


@functools.lru_cache(maxsize=4)
def _permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  # Cached: an ImageNet-sized permutation costs tens of ms, and every step of an epoch
  # (and every prefetch thread) uses the same one.
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  order.flags.writeable = False
  return order


def batches(split: Union[Split, Stream], batch_size: int, seed: int, start_step: int = 0,
            rows: slice = slice(None), read_threads: int = 8,
            prefetch: int = 4) -> Iterator[dict]:
  """Endless training batches {"image", "label"}, starting at `start_step`.

  `rows` picks this process's rows of each global batch of `batch_size` (all by default);
  only those records are read. A `Stream` is read by grain with `read_threads` threads and
  `prefetch` batches read ahead.
  """
  if isinstance(split, Stream):
    yield from stream_batches(split, batch_size, seed, start_step, rows, read_threads,
                              prefetch)
    return
  step = start_step
  while True:
    idx = batch_indices(step, len(split), batch_size, seed)[rows]
    yield {"image": split.images[idx], "label": split.labels[idx]}
    step += 1


def stream_batches(stream: Stream, batch_size: int, seed: int, start_step: int = 0,
                   rows: slice = slice(None), read_threads: int = 8,
                   prefetch: int = 4) -> Iterator[dict]:
  """`batches` for a `Stream`: a grain MapDataset over step numbers, each step mapped to
  its records, then read ahead by grain's threads.

  Indexing by step (not by a stateful shuffle buffer) keeps resume exact: the batch at
  step k is `batch_indices(k, ...)` whatever happened before.
  """
  import grain

  num_examples = len(stream)
  batch_indices(start_step, num_examples, batch_size, seed)  # fail early on a bad size

  def read(step):
    idx = batch_indices(int(step), num_examples, batch_size, seed)[rows]
    # One record at a time: `source[i]` is what every TFDS source (and its mock) serves.
    images, labels = _to_arrays([stream.source[int(i)] for i in idx], stream.spec)
    return {"image": images, "label": labels}

  steps = grain.MapDataset.range(start_step, np.iinfo(np.int64).max).map(read)
  options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
  return iter(steps.to_iter_dataset(options))


def _builder(name, data_dir):
  import tensorflow_datasets as tfds

  if name == "digits":
    from cfg_jax.data.digits import Digits

    return Digits(data_dir=data_dir, file_format="array_record")
  try:
    return tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except Exception as e:  # TFDS raises several types for a missing builder or module.
    raise DatasetError(f"TFDS could not build {name!r} ({type(e).__name__}: {e}).") from e
