"""Classifier-free guided diffusion on MNIST (a TFDS catalog data set: needs network once).

  python train.py --config configs/mnist.py --workdir runs/mnist --config.data.download=True

Later runs read the prepared copy from --config.data.data_dir (default ~/tensorflow_datasets).
A GPU is advised: this is about 30× the digits model's work per step.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.data.name = "mnist"
  config.model.base_channels = 64
  config.model.channel_mult = (1, 2, 2)  # 28 → 14 → 7
  config.model.attention_resolutions = (7,)
  config.classifier.model.base_channels = 64
  config.classifier.model.channel_mult = (1, 2, 2)
  config.classifier.model.attention_resolutions = (7,)
  config.train.num_steps = 20_000
  config.train.batch_size = 128
  config.train.checkpoint_every = 2_000
  config.train.log_every = 200
  config.classifier.num_steps = 5_000
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 1_000
  # A long run at a constant rate, averaged by a long EMA (digits' classifier already
  # trains at a constant 1e-3, with p_uncond 0.2 and min-SNR-5 as digits).
  config.optimizer.decay = "constant"
  config.train.ema_decay = 0.999
  return config
