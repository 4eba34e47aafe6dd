"""`sharded_sampling.sample_batches` shards each batch over a mesh; the samples must not
depend on it."""

import jax
import numpy as np
from jax.tree_util import Partial

from cfg_jax import distributed, models, pipeline, sharded_sampling
from cfg_jax.train import denoiser


def test_one_device_gives_the_samples_of_all_devices(tiny_config):
  assert jax.device_count() > 1, "tests/conftest.py asks XLA for several host devices"
  graphdef, params = denoiser.create_denoiser(tiny_config, 0)  # untrained is enough
  model = pipeline.Pipeline.from_config(tiny_config, Partial(models.apply, graphdef, params))
  labels = np.arange(13) % 10  # 13: divides no device count here, so batches are padded
  sample = lambda mesh: sharded_sampling.sample_batches(
      jax.random.key(3), model, labels, batch_size=7, mesh=mesh, num_steps=3,
      timestep_spacing="trailing", guidance_scale=2.0)
  everywhere = sample(None)  # the default: every device
  one = sample(distributed.data_mesh(jax.devices()[:1]))
  assert everywhere.shape == (13, 8, 8, 1) and everywhere.dtype == np.uint8
  assert len({image.tobytes() for image in everywhere}) > 1  # not one image repeated
  np.testing.assert_array_equal(one, everywhere)
