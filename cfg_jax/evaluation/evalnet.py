"""The evaluation network: a small clean CNN classifier trained on the real training split.

Its logits judge class accuracy and its penultimate features are the embedding for FID and
precision/recall, the role Inception-v3 plays on ImageNet. It is kept apart from every
network used for guidance (its own checkpoint directory, its own seed), so the samples
are never judged by the network that steered them.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from cfg_jax import checkpoints, data, images, training
from cfg_jax.models import unet

DEFAULTS = dict(channels=(32, 64), features=128, dropout=0.3, num_steps=1500, batch_size=128,
                learning_rate=1e-3, weight_decay=1e-4, seed=1234)


class EvalCNN(nnx.Module):
  """conv-conv-pool blocks → dense features → logits."""

  def __init__(self, image_shape, num_classes, channels=(32, 64), features=128, dropout=0.3, *,
               rngs):
    h, _, c = image_shape
    self.convs = nnx.List()
    for out in channels:
      self.convs.append(nnx.List([nnx.Conv(c, out, (3, 3), rngs=rngs),
                                  nnx.Conv(out, out, (3, 3), rngs=rngs)]))
      c, h = out, h // 2
    self.dense = nnx.Linear(h * h * c, features, rngs=rngs)
    self.head = nnx.Linear(features, num_classes, rngs=rngs)
    self.dropout = dropout

  def __call__(self, x, dropout_rng=None):
    """(logits, penultimate features)."""
    for conv_a, conv_b in self.convs:
      x = nnx.relu(conv_b(nnx.relu(conv_a(x))))
      x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    features = nnx.relu(self.dense(x.reshape(x.shape[0], -1)))
    return self.head(unet.dropout(features, self.dropout, dropout_rng)), features


def _create(dataset: str, settings: dict):
  spec = data.spec(dataset)
  model = EvalCNN(spec.image_shape, spec.num_classes, tuple(settings["channels"]),
                  settings["features"], settings["dropout"], rngs=nnx.Rngs(settings["seed"]))
  return unet.split_params(model)


def _optimizer(settings):
  return optax.adamw(settings["learning_rate"], weight_decay=settings["weight_decay"])


def _make_step(graphdef, tx):
  def step(state, batch, rng):
    rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
      logits, _ = nnx.merge(graphdef, params)(batch["image"], dropout_rng=rng)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, jnp.mean(jnp.argmax(logits, -1) == batch["label"])

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return training.TrainState(state.step + 1, params, None, opt_state), {"loss": loss,
                                                                           "accuracy": acc}

  return step


class EvalNet:
  """A trained evaluation network: uint8 NHWC images → (logits, features)."""

  def __init__(self, graphdef, params, dataset: str, test_accuracy: float):
    self.dataset, self.test_accuracy = dataset, test_accuracy
    self._apply = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    self._params = params

  def __call__(self, uint8_images, batch_size: int = 1000):
    x = images.from_uint8(uint8_images)
    outs = [self._apply(self._params, x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    logits = np.concatenate([np.asarray(o[0]) for o in outs])
    return logits, np.concatenate([np.asarray(o[1]) for o in outs])


def default_directory(dataset: str) -> str:
  return os.path.join("runs", "evalnet", dataset)


def load_or_train(dataset: str, directory: Optional[str] = None, data_dir: Optional[str] = None,
                  **overrides) -> EvalNet:
  """Loads the evaluation network from `directory`, training and saving it first if absent."""
  directory = directory or default_directory(dataset)
  settings = {**DEFAULTS, **overrides, "dataset": dataset}
  graphdef, params = _create(dataset, settings)
  tx = _optimizer(settings)
  state = training.init_state(params, tx)
  mngr = checkpoints.manager(directory, max_to_keep=1)
  if mngr.latest_step() is not None:
    state = checkpoints.resume(mngr, state, settings, ["dataset", "channels", "features"])
    test_accuracy = checkpoints.read_config(directory)["test_accuracy"]
  else:
    logging.info("Training the %s evaluation network into %s.", dataset, directory)
    train = data.load_split(dataset, "train", data_dir)
    mesh = training.data_mesh()
    writer = training.MetricWriter(directory, "evalnet")
    try:
      state = training.fit(
          state=training.replicate(state, mesh), mesh=mesh,
          train_step=training.jit_data_parallel(_make_step(graphdef, tx), mesh),
          batches=data.batches(train, settings["batch_size"], settings["seed"]),
          rng=jax.random.key(settings["seed"]), num_steps=settings["num_steps"],
          manager=None, config_dict=None, writer=writer, log_every=500,
          checkpoint_every=settings["num_steps"] + 1, batch_size=settings["batch_size"],
          description="evalnet")
    finally:
      writer.close()
    test = data.load_split(dataset, "test", data_dir)
    logits, _ = EvalNet(graphdef, state.params, dataset, 0.0)(images.to_uint8(test.images))
    test_accuracy = float(np.mean(np.argmax(logits, -1) == test.labels))
    checkpoints.save(mngr, int(state.step), state, {**settings, "test_accuracy": test_accuracy})
    mngr.wait_until_finished()
    logging.info("Evaluation network test accuracy: %.4f", test_accuracy)
  return EvalNet(graphdef, state.params, dataset, test_accuracy)
