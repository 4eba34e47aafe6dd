"""Training and loading the evaluation network (`cfg_jax.models.eval_cnn.EvalCNN`).

It is kept apart from every network used for guidance (its own directory and seed), so
samples are never judged by the network that steered them. It lives in one fixed place per
data set, the user's cache (`$XDG_CACHE_HOME/cfg_jax/evalnet/<data set>`, by default
`~/.cache/...`), whatever the working directory, so scores stay comparable across runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from cfg_jax import checkpoints, data, distributed, errors, images, models, paths
from cfg_jax.app import locking
from cfg_jax.models.eval_cnn import EvalCNN
from cfg_jax.train import loop

DEFAULTS = dict(channels=(32, 64), features=128, dropout=0.3, num_steps=1500, batch_size=128,
                learning_rate=1e-3, weight_decay=1e-4, seed=1234)
# Settings that shape the saved network: a saved one with other values is not reused.
STATE_KEYS = ("dataset", "channels", "features")


def _create(dataset: str, settings: dict, abstract: bool = False):
  spec = data.spec(dataset)
  args = (EvalCNN, spec.image_shape, spec.num_classes, tuple(settings["channels"]),
          settings["features"], settings["dropout"])
  if abstract:
    return models.abstract(*args)
  return models.create(*args, seed=loop.key_streams(settings["seed"]).init)


def _loss_fn(graphdef):
  def loss_fn(params, batch, key):
    logits, _ = models.apply(graphdef, params, batch["image"], dropout_key=key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

  return loss_fn


class EvalNet:
  """A trained evaluation network: uint8 NHWC images → (logits, features)."""

  def __init__(self, graphdef, params, dataset: str, test_accuracy: float):
    self.dataset, self.test_accuracy = dataset, test_accuracy
    self._apply = jax.jit(lambda p, x: models.apply(graphdef, p, x))
    self._params = params

  def __call__(self, uint8_images, batch_size: int = 1000):
    x = images.from_uint8(uint8_images)
    outs = [self._apply(self._params, x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    logits = np.concatenate([np.asarray(o[0]) for o in outs])
    return logits, np.concatenate([np.asarray(o[1]) for o in outs])


def default_directory(dataset: str) -> str:
  return os.path.join(paths.user_cache_dir(), "evalnet", dataset)


def load(dataset: str, directory: Optional[str] = None) -> Optional[EvalNet]:
  """The saved evaluation network, or None if there is none yet."""
  directory = directory or default_directory(dataset)
  if not os.path.isdir(directory) or checkpoints.manager(directory, create=False).latest_step() \
      is None:
    return None
  saved = checkpoints.read_config(directory)
  graphdef, abstract_params = _create(dataset, saved, abstract=True)
  params = checkpoints.restore_subtree(directory, "params", abstract_params)
  return EvalNet(graphdef, params, dataset, saved["test_accuracy"])


def load_or_train(dataset: str, directory: Optional[str] = None, data_dir: Optional[str] = None,
                  **overrides) -> EvalNet:
  """Loads the evaluation network from `directory`, training and saving it first if absent.

  Training holds a lock beside `directory` (a second process waits, then loads what the
  first saved) and happens in a temporary folder renamed onto `directory` when complete, so
  `directory` never holds a half-written network. The processes of one multi-process job
  only load it: a network not yet trained is a `UserError` naming the command to train it.
  """
  directory = os.path.abspath(directory or default_directory(dataset))
  settings = {**DEFAULTS, **overrides, "dataset": dataset}
  net = _load_checked(dataset, directory, settings)
  if net is not None:
    return net
  if distributed.process_count() > 1:
    # Training it is one process's job: the lock holder would enter collectives alone.
    args = [repr(dataset)]
    if directory != os.path.abspath(default_directory(dataset)):
      args.append(repr(directory))
    if data_dir:
      args.append(f"data_dir={data_dir!r}")
    raise errors.UserError(
        f"The {dataset} evaluation network is not trained yet ({directory} holds none), and a "
        "multi-process run cannot train it; train it once in a single process: python -c "
        f"\"from cfg_jax.evaluation import evalnet; evalnet.load_or_train({', '.join(args)})\", "
        "then run this again.")
  with locking.exclusive(directory + ".lock", wait=True, what=f"evaluation network {directory}"):
    net = _load_checked(dataset, directory, settings)  # trained while we waited
    if net is not None:
      return net
    if os.path.isdir(directory) and os.listdir(directory):
      raise errors.UserError(f"{directory} exists but holds no evaluation network; remove it "
                             "or pass another --evalnet_dir.")
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-",
                           dir=os.path.dirname(directory))
    try:
      net = _train(dataset, tmp, data_dir, settings)
      if os.path.isdir(directory):
        os.rmdir(directory)  # empty, checked above
      os.replace(tmp, directory)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
  return net


def _load_checked(dataset: str, directory: str, settings: dict) -> Optional[EvalNet]:
  """The saved network if `directory` holds one trained with `settings`' shape, else None."""
  if not os.path.isdir(directory):
    return None
  if checkpoints.manager(directory, create=False).latest_step() is None:
    return None
  checkpoints.check_compatible(checkpoints.read_config(directory), settings, STATE_KEYS)
  return load(dataset, directory)


def _one_device_mesh():
  """One device in a single-process run, so the judge does not depend on the device count
  (a data-parallel all-reduce sums gradients in another order); None (all devices) else."""
  return distributed.data_mesh(jax.devices()[:1]) if jax.process_count() == 1 else None


def _train(dataset: str, directory: str, data_dir: Optional[str], settings: dict) -> EvalNet:
  logging.info("Training the %s evaluation network into %s.", dataset, directory)
  graphdef, params = _create(dataset, settings)
  train = data.load_split(dataset, "train", data_dir)
  state = loop.fit(description="evalnet", loss_fn=_loss_fn(graphdef), params=params,
                   tx=optax.adamw(settings["learning_rate"],
                                  weight_decay=settings["weight_decay"]),
                   split=train, seed=settings["seed"], batch_size=settings["batch_size"],
                   num_steps=settings["num_steps"], workdir=directory, log_every=500,
                   mesh=_one_device_mesh())
  test = data.load_split(dataset, "test", data_dir)
  logits, _ = EvalNet(graphdef, state.params, dataset, 0.0)(images.to_uint8(test.images))
  test_accuracy = float(np.mean(np.argmax(logits, -1) == test.labels))
  mngr = checkpoints.manager(directory, max_to_keep=1)
  checkpoints.save(mngr, int(state.step), state, {**settings, "test_accuracy": test_accuracy})
  mngr.wait_until_finished()
  logging.info("Evaluation network test accuracy: %.4f", test_accuracy)
  return EvalNet(graphdef, state.params, dataset, test_accuracy)
