"""cfg-jax: classifier and classifier-free guided diffusion in JAX/Flax.

`cfg_jax.load(workdir)` gives a trained model ready to sample (see `cfg_jax.pipeline`);
`cfg_jax.sampling.sample` is the functional core it calls.
"""

__version__ = "0.1.0"


def load(workdir: str, classifier_workdir=None, step=None):
  """The trained model in `workdir` (at `step`, default the latest) as a
  `cfg_jax.pipeline.Pipeline`."""
  from cfg_jax import pipeline  # imported on use: `import cfg_jax` stays light

  return pipeline.load(workdir, classifier_workdir, step)
