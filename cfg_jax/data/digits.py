"""The embedded default data set: scikit-learn's 1,797 real 8×8 handwritten digits.

scikit-learn ships the images inside its wheel, so preparing needs no network. The builder
writes ArrayRecord files, which TFDS prepares and `tfds.data_source` reads without
TensorFlow.
"""

import numpy as np
import tensorflow_datasets as tfds

# A fixed, seeded split: 1,437 train / 360 test images (80/20, stratified by shuffling).
_SPLIT_SEED = 0
_NUM_TEST = 360


class Digits(tfds.core.GeneratorBasedBuilder):
  """8×8 grey-scale digits 0–9 with pixel values 0–16 (UCI optical digits, via sklearn)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ships with scikit-learn
    images, labels = _load_sklearn_digits()
    order = np.random.default_rng(_SPLIT_SEED).permutation(len(labels))
    test, train = order[:_NUM_TEST], order[_NUM_TEST:]
    return {
        "train": self._generate_examples(images[train], labels[train], train),
        "test": self._generate_examples(images[test], labels[test], test),
    }

  def _generate_examples(self, images, labels, indices):
    for image, label, index in zip(images, labels, indices):
      yield int(index), {"image": image, "label": int(label)}


def _load_sklearn_digits():
  from sklearn.datasets import load_digits  # imported lazily: only preparing needs it

  digits = load_digits()
  images = digits.images.astype(np.uint8)[..., None]  # (1797, 8, 8, 1), values 0..16
  return images, digits.target.astype(np.int64)
