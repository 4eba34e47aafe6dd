"""A DiT trained on the latents of a Stable Diffusion VAE (latent diffusion, as DiT itself).

  python convert.py dit --pretrained DiT-XL-2-256 --workdir runs/dit256     # has the VAE
  python train.py --config configs/dit_latent.py --workdir runs/dit_cifar \
      --config.latent.vae_workdir=runs/dit256 --config.data.download=True

The VAE of `latent.vae_workdir` stays frozen and is copied into the new workdir; the split
is encoded once and every step draws z ~ q(z | x). CIFAR-10's 32×32 images give 4×4×4 SD-VAE
latents, so the patch is 1. No noisy classifier: it would train on pixels.
"""

from configs import dit_digits


def get_config():
  config = dit_digits.get_config()
  config.data.name = "cifar10"
  config.latent = dict(vae_workdir="runs/dit256")
  config.model.patch_size = 1
  config.classifier.num_steps = 0
  config.sampling.classifier_scales = ()
  return config
