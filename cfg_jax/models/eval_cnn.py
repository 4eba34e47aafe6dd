"""The evaluation network: a small clean CNN classifier of real images (no noise input).

Its logits judge class accuracy and its penultimate features are the embedding for FID and
precision/recall, the role Inception-v3 plays on ImageNet. Training and loading live in
`cfg_jax.evaluation.evalnet`.
"""

from __future__ import annotations

from flax import nnx

from cfg_jax.models import layers


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

  def __call__(self, x, dropout_key=None):
    """(logits, penultimate features)."""
    for conv_a, conv_b in self.convs:
      x = nnx.relu(conv_b(nnx.relu(conv_a(x))))
      x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
    features = nnx.relu(self.dense(x.reshape(x.shape[0], -1)))
    return self.head(layers.dropout(features, self.dropout, dropout_key)), features
