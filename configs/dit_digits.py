"""A small DiT (Peebles & Xie 2023) with classifier-free guidance on the embedded 8×8 digits.

  python train.py --config configs/dit_digits.py --workdir runs/dit_digits

The same training as configs/digits.py (conditioning dropout, EMA, the noisy classifier
for classifier guidance) with the UNet replaced by a DiT in pixel space: 2×2 patches make
16 tokens of width 128. The label table gets its null row from diffusion.p_uncond.
"""

from configs import digits


def get_config():
  config = digits.get_config()
  config.model = dict(
      family="dit",
      patch_size=2,
      hidden_size=128,
      depth=6,
      num_heads=4,
      mlp_ratio=4.0,
      dropout=0.0,
      learn_sigma=False,  # cfg-jax trains ε alone
  )
  # The recipe docs/results.md measured (the UNet main job's defaults until they changed).
  config.optimizer.update(learning_rate=1e-3, decay="cosine")
  config.train.num_steps = 2000
  config.train.ema_decay = 0.995
  config.diffusion.p_uncond = 0.1
  config.diffusion.min_snr_gamma = None
  config.classifier.num_steps = 200
  config.classifier.optimizer.update(learning_rate=2e-3, decay="cosine")
  return config
