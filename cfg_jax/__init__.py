"""cfg-jax: classifier and classifier-free guided diffusion in JAX/Flax."""

__version__ = "0.1.0"
