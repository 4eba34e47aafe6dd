"""DiT (Peebles & Xie 2023) on the latents of the Stable Diffusion VAE, in Flax NNX.

`network.DiT` is the ε-network (with learned variance), `vae.AutoencoderKL` the autoencoder
whose latents it models, `port` turns diffusers' and DiT's own PyTorch checkpoints and
configs into ours.
"""
