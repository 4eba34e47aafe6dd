"""Training: the shared loop (`loop`), the denoiser ε_θ (`denoiser`) and the noisy classifier
(`classifier`). The main job that runs them is `cfg_jax.app.train_job`."""
