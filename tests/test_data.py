import numpy as np
import pytest

from cfg_jax import data


def test_digits_splits_values_and_labels(digits_train):
  test = data.load_split("digits", "test")
  assert digits_train.images.shape == (1437, 8, 8, 1) and test.images.shape == (360, 8, 8, 1)
  assert digits_train.images.dtype == np.float32 and digits_train.labels.dtype == np.int32
  for split in (digits_train, test):
    assert split.images.min() == -1.0 and split.images.max() == 1.0
    assert set(np.unique(split.labels)) == set(range(10))
  # Pixel values 0..16 map to (v / 16)·2 − 1 exactly.
  np.testing.assert_allclose(np.unique((digits_train.images + 1) / 2 * 16) % 1, 0, atol=1e-5)


def test_split_is_fixed_and_matches_sklearn(digits_train):
  from sklearn.datasets import load_digits

  raw = load_digits()
  order = np.random.default_rng(0).permutation(1797)
  # The same split as the builder's: the sorted train set equals sklearn's rows order[360:].
  expected = raw.images[order[360:]][..., None] / 16 * 2 - 1
  np.testing.assert_allclose(np.sort(expected.reshape(len(expected), -1), axis=0),
                             np.sort(digits_train.images.reshape(1437, -1), axis=0), atol=1e-6)
  assert np.bincount(digits_train.labels).tolist() == np.bincount(raw.target[order[360:]]).tolist()


def test_batches_are_a_pure_function_of_the_step(digits_train):
  first = [b["label"] for _, b in zip(range(30), data.batches(digits_train, 100, seed=3))]
  later = data.batches(digits_train, 100, seed=3, start_step=20)
  resumed = [b["label"] for _, b in zip(range(10), later)]
  for a, b in zip(first[20:], resumed):
    np.testing.assert_array_equal(a, b)
  # Within an epoch (14 batches of 100) no example repeats.
  epoch = np.concatenate([data.batch_indices(s, 1437, 100, 3) for s in range(14)])
  assert len(np.unique(epoch)) == 1400


def test_unknown_and_unprepared_data_sets_are_clear_errors(tmp_path):
  with pytest.raises(data.DatasetError, match="Unknown data set 'imagenet'"):
    data.load_split("imagenet", "train")
  with pytest.raises(data.DatasetError, match="not prepared.*download=True"):
    data.load_split("mnist", "train", data_dir=str(tmp_path), download=False)


def _take(iterator, n):
  return [b for _, b in zip(range(n), iterator)]


def test_streaming_batches_equal_in_memory_batches(digits_train):
  stream = data.open_split("digits", "train", streaming=True)
  assert isinstance(stream, data.Stream) and len(stream) == len(digits_train)
  memory = _take(data.batches(digits_train, 64, seed=5, start_step=20), 4)  # crosses an epoch
  streamed = _take(data.batches(stream, 64, seed=5, start_step=20, read_threads=2), 4)
  for a, b in zip(memory, streamed):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])
  # Two processes' rows of each global batch make up the whole batch.
  halves = [_take(data.batches(stream, 64, seed=5, start_step=20, rows=r), 4)
            for r in (slice(0, 32), slice(32, 64))]
  for whole, first, second in zip(memory, *halves):
    np.testing.assert_array_equal(whole["image"],
                                  np.concatenate([first["image"], second["image"]]))


def test_catalog_set_streams_offline_with_mock_data(tmp_path):
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=40, policy=tfds.testing.MockPolicy.USE_CODE):
    # Under the mock, "preparing" writes nothing and needs no network.
    stream = data.open_split("mnist", "train", data_dir=str(tmp_path), download=True,
                             streaming=True)
    assert len(stream) == 40
    batch = next(data.batches(stream, 8, seed=0, start_step=3, rows=slice(4, 8)))
    idx = data.batch_indices(3, 40, 8, seed=0)[4:8]
    raw = np.stack([stream.source[int(i)]["image"] for i in idx])
  assert batch["image"].shape == (4, 28, 28, 1) and batch["image"].dtype == np.float32
  np.testing.assert_allclose(batch["image"], raw / 255.0 * 2 - 1, atol=1e-6)
  assert batch["label"].dtype == np.int32 and set(batch["label"]) <= set(range(10))


def test_preparing_images_without_tensorflow_names_the_install(tmp_path, monkeypatch):
  import importlib.util

  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed: TFDS can encode images")
  from tests import image_builder

  monkeypatch.setitem(data.DATASETS, "tiny_images", data.DatasetSpec((4, 4, 1), 2, 255.0))
  monkeypatch.setattr(data, "_builder", lambda name, d: image_builder.TinyImages(data_dir=d))
  with pytest.raises(data.DatasetError, match="needs TensorFlow.*pip install tensorflow-cpu"):
    data.load_split("tiny_images", "train", data_dir=str(tmp_path), download=True)
