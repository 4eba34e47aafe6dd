"""Training: the shared loop (`loop`), the diffusion model (`diffusion`), the noisy
classifier (`classifier`) and the main job that runs them and writes sample grids (`job`)."""
