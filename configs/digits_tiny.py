"""A seconds-long smoke test of the whole pipeline (used by the test suite).

  python train.py --config configs/digits_tiny.py --workdir /tmp/tiny
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model.base_channels = 8
  config.model.num_groups = 4
  config.classifier.model.base_channels = 8
  config.classifier.model.num_groups = 4
  config.train.num_steps = 4
  # A constant rate: tests resume and extend tiny runs, and cosine is fixed by num_steps.
  config.optimizer.decay = "constant"
  config.classifier.optimizer.decay = "constant"
  config.train.batch_size = 16
  config.train.log_every = 2
  config.train.checkpoint_every = 2
  config.train.keep_steps = ()
  config.classifier.num_steps = 2
  config.classifier.batch_size = 16
  # Fast, not good: "leading" starts at t = 750, where the cosine ᾱ = 0.14 is far from
  # pure noise, so sampling warns (timestep_spacing="trailing" would start at t = 999).
  config.sampling.num_steps = 4
  config.sampling.samples_per_class = 1
  config.sampling.guidance_scales = (3.0,)
  config.sampling.classifier_scales = (1.0,)
  return config
