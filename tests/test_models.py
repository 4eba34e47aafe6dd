import jax
import jax.numpy as jnp
import numpy as np
import ml_collections
import pytest
from flax import nnx

from cfg_jax import models, schedules
from cfg_jax.models import conv, layers, unet
from cfg_jax.train import denoiser
from configs import digits, digits_tiny

CONFIG = ml_collections.ConfigDict(dict(
    image_shape=(8, 8, 1), num_classes=10, base_channels=8, channel_mult=(1, 2),
    num_res_blocks=2, attention_resolutions=(4,), dropout=0.1, num_groups=4, num_heads=2))


def _perturbed(params, seed=0):
  # Output layers start at zero (ADM's zero_module); perturb so outputs depend on inputs.
  # NumPy draws: JAX's would compile one random-number program per leaf shape (~16 s).
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + jnp.asarray(0.1 * rng.standard_normal(p.shape), p.dtype), params)


def test_unet_shapes_null_label_and_dropout():
  graphdef, params = models.create(unet.UNet, CONFIG, seed=0)
  assert params["class_embed"]["embedding"].shape[0] == 11  # ten classes + the null label
  params = _perturbed(params)
  x = jax.random.normal(jax.random.key(1), (3, 8, 8, 1))
  t = jnp.array([0, 500, 999])
  apply = jax.jit(models.apply, static_argnums=0)
  cond = apply(graphdef, params, x, t, jnp.array([1, 2, 3]))
  null = apply(graphdef, params, x, t, jnp.array([10, 10, 10]))
  assert cond.shape == x.shape and bool(jnp.all(jnp.isfinite(cond)))
  assert float(jnp.max(jnp.abs(cond - null))) > 1e-3
  same = [apply(graphdef, params, x, t, jnp.array([1, 2, 3])) for _ in range(2)]
  np.testing.assert_array_equal(same[0], same[1])
  dropped = apply(graphdef, params, x, t, jnp.array([1, 2, 3]), dropout_key=jax.random.key(2))
  assert float(jnp.max(jnp.abs(dropped - same[0]))) > 1e-4


def test_noisy_classifier_logits():
  graphdef, params = models.create(unet.NoisyClassifier, CONFIG, seed=0)
  assert "class_embed" not in params
  logits = jax.jit(models.apply, static_argnums=0)(  # op by op, each op would compile alone
      graphdef, params, jnp.zeros((5, 8, 8, 1)), jnp.arange(5) * 100)
  assert logits.shape == (5, 10)


def test_timestep_embedding_matches_guided_diffusion():
  emb = layers.timestep_embedding(jnp.array([0, 7]), 6)
  freqs = np.exp(-np.log(10_000) * np.arange(3) / 3)
  np.testing.assert_allclose(emb[1], np.concatenate([np.cos(7 * freqs), np.sin(7 * freqs)]),
                             rtol=1e-5)


def test_catalog_config_builds_a_matching_unet():
  """configs/mnist.py (not trained here: it needs a download) gives 28×28 shapes."""
  from configs import mnist

  config = mnist.get_config()
  graphdef, params = models.abstract(unet.UNet, models.model_config(config))
  out = jax.eval_shape(lambda p: models.apply(graphdef, p, jnp.zeros((2, 28, 28, 1)),
                                             jnp.zeros((2,), jnp.int32),
                                             jnp.full((2,), 10)), params)
  assert out.shape == (2, 28, 28, 1)


def test_abstract_model_has_the_structure_of_an_initialised_one():
  """`models.abstract` (the restore target) allocates nothing, yet matches a real init."""
  _, real = models.create(unet.UNet, CONFIG, seed=0)
  _, abstract = models.abstract(unet.UNet, CONFIG)
  assert jax.tree_util.tree_structure(real) == jax.tree_util.tree_structure(abstract)
  for a, r in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(real)):
    assert isinstance(a, jax.ShapeDtypeStruct) and (a.shape, a.dtype) == (r.shape, r.dtype)


def test_group_norm_matches_flax_group_norm_with_scale_shift():
  # unet.group_norm is a faster formulation of nnx.GroupNorm (+ the ResBlock scale-shift).
  norm = nnx.GroupNorm(16, num_groups=4, rngs=nnx.Rngs(0))
  norm.scale[...] = jax.random.normal(jax.random.key(1), (16,))
  norm.bias[...] = jax.random.normal(jax.random.key(2), (16,))
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(3), (5, 4, 4, 16))
  scale, shift = jax.random.normal(jax.random.key(4), (2, 5, 16))
  np.testing.assert_allclose(unet.group_norm(norm, x), norm(x), atol=2e-5)
  np.testing.assert_allclose(unet.group_norm(norm, x, scale, shift),
                             norm(x) * (1 + scale[:, None, None]) + shift[:, None, None],
                             atol=5e-5)


def test_bfloat16_compute_keeps_float32_weights_and_matches_float32():
  config = digits_tiny.get_config()
  graphdef, params = denoiser.create_denoiser(config, 0)
  # Non-zero output convs, so the outputs depend on every layer.
  params = jax.tree_util.tree_map(lambda p: p + 0.05 * jnp.cos(jnp.arange(p.size)).reshape(
      p.shape), params)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 1)), jnp.float32)
  t, y = jnp.array([0, 300, 600, 999]), jnp.array([0, 3, 9, 10])
  # Jitted: run op by op, the network's hundreds of small ops each compile on their own.
  full = jax.jit(models.apply, static_argnums=0)(graphdef, params, x, t, y)
  half = jax.jit(models.apply_in_dtype, static_argnums=0, static_argnames="dtype")(
      graphdef, params, x, t, y, dtype="bfloat16")
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, full, atol=0.05 * float(jnp.max(jnp.abs(full))))
  assert not np.array_equal(half, full)  # it did compute in bfloat16
  # Every convolution runs in bfloat16: nothing promotes the network back to float32.
  jaxpr = str(jax.make_jaxpr(lambda p: models.apply_in_dtype(
      graphdef, p, x, t, y, dtype="bfloat16"))(params))
  convs = [line for line in jaxpr.splitlines() if "conv_general_dilated" in line]
  assert convs and all("bf16" in line and "f32[" not in line.split("=")[0] for line in convs)
  # The loss's gradient reaches the float32 master weights as float32.
  loss_fn = denoiser.make_loss_fn(
      graphdef, schedules.from_config(config.diffusion),
      _with_dtype(config, "bfloat16"))
  batch = {"image": x, "label": jnp.array([0, 1, 2, 3])}
  # (Traced, not compiled: the dtypes are the question, and a bfloat16 gradient compiles
  # slowly; the bfloat16 forward above is the compiled one.)
  grads = jax.eval_shape(jax.grad(lambda p: loss_fn(p, batch, jax.random.key(0))[0]), params)
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))


def _with_dtype(config, dtype):
  config = config.copy_and_resolve_references()
  config.train.dtype = dtype
  return config


@pytest.mark.parametrize("size", [8, 7])
@pytest.mark.parametrize("kernel", [1, 2, 3])
@pytest.mark.parametrize("stride", [1, 2])
def test_same_conv_gradients_match_lax(size, kernel, stride):
  x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 3))
  k = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 5))

  def lax_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def ours(x, k):
    return conv.same_conv(x, k, (stride, stride))

  cotangent = jax.random.normal(jax.random.key(2), lax_conv(x, k).shape)

  def loss(conv_fn):
    return lambda x, k: jnp.sum(jnp.sin(conv_fn(x, k)) * cotangent)

  np.testing.assert_allclose(ours(x, k), lax_conv(x, k), atol=1e-5)
  for ours_grad, lax_grad in zip(jax.grad(loss(ours), (0, 1))(x, k),
                                 jax.grad(loss(lax_conv), (0, 1))(x, k)):
    np.testing.assert_allclose(ours_grad, lax_grad, atol=1e-4)


def test_unet_convolutions_take_the_fast_gradient_path_and_match_nnx_conv(monkeypatch):
  config = models.model_config(digits_tiny.get_config())
  graphdef, params = models.create(unet.NoisyClassifier, config, seed=0)
  params = _perturbed(params)
  # The same classifier built from plain nnx.Conv layers (the same parameter tree).
  monkeypatch.setattr(conv, "Conv", nnx.Conv)
  plain_graphdef, _ = models.abstract(unet.NoisyClassifier, config)
  x = jax.random.normal(jax.random.key(0), (4, *config.image_shape))
  t = jnp.array([0, 10, 500, 999])

  def input_grad(graphdef):
    return jax.jit(jax.grad(lambda x: jnp.sum(
        jax.nn.log_softmax(models.apply(graphdef, params, x, t))[:, 0])))(x)

  np.testing.assert_allclose(input_grad(graphdef), input_grad(plain_graphdef), rtol=1e-4,
                             atol=1e-5)
  assert "custom_vjp" in str(jax.make_jaxpr(lambda x: models.apply(graphdef, params, x, t))(x))


def test_classifier_gradient_in_a_scan_has_no_unfused_convolution():
  """The regression behind a 1.7× slower classifier-guided sampler step on XLA:CPU.

  The default model's widths: YNNPACK leaves the tiny config's 8-channel convolutions alone.
  """
  config = models.model_config(digits.get_config())
  graphdef, params = models.create(unet.NoisyClassifier, config, seed=0)
  t = jnp.full((8,), 500)

  def guided_steps(params, x):
    def step(x, _):
      grad = jax.grad(lambda x: jnp.sum(models.apply(graphdef, params, x, t)[:, 0]))(x)
      return x + 0.01 * grad, None
    return jax.lax.scan(step, x, None, length=3)[0]

  x = jnp.zeros((8, *config.image_shape))
  text = jax.jit(guided_steps).lower(params, x).compile().as_text()
  if "ynn_fusion" not in text:
    pytest.skip("this XLA:CPU does not fuse convolutions through YNNPACK")
  assert conv.unfused_convolutions(text) == 0
