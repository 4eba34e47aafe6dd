"""OpenAI's ADM (guided-diffusion) UNet and noisy classifier in Flax NNX, with a weight port.

`network` holds the modules (`UNetModel`, `EncoderUNetModel`), `port` converts guided-diffusion
PyTorch state dicts into their params, `presets` turns guided-diffusion's flags and the
released checkpoints' presets into network configs.
"""
