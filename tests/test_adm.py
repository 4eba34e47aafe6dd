"""cfg_jax.models.adm against guided-diffusion itself: outputs, parameter names, flags."""

import argparse
import inspect
import math
import pickle

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

torch = pytest.importorskip("torch")
gd_unet = pytest.importorskip("guided_diffusion.unet")
script_util = pytest.importorskip("guided_diffusion.script_util")

from cfg_jax import errors, models  # noqa: E402
from cfg_jax.models.adm import network, port, presets  # noqa: E402

# Small UNets that together take every option of guided-diffusion's UNetModel.
UNETS = {
    # Legacy attention order with num_heads (and more heads upsampling), conv resampling,
    # additive embedding, labels, attention at two resolutions.
    "legacy_heads": dict(
        image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
        attention_resolutions=(1, 2), num_heads=2, num_head_channels=-1,
        num_heads_upsample=4, use_new_attention_order=False, use_scale_shift_norm=False,
        resblock_updown=False, class_cond=True, learn_sigma=False, conv_resample=True),
    # New attention order with num_head_channels, scale-shift norm, ResBlock up/down, no
    # labels, learnt variance, three levels.
    "new_order_updown": dict(
        image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 1, 2),
        attention_resolutions=(2, 4), num_heads=1, num_head_channels=16,
        num_heads_upsample=-1, use_new_attention_order=True, use_scale_shift_norm=True,
        resblock_updown=True, class_cond=False, learn_sigma=True, conv_resample=True),
    # A half-width first level (512x512's 0.5), average-pool / nearest resampling without
    # convs, two blocks a level, legacy order with num_head_channels, labels, learnt
    # variance, dropout.
    "half_width_pool": dict(
        image_size=16, model_channels=64, num_res_blocks=2, channel_mult=(0.5, 1),
        attention_resolutions=(2,), num_heads=4, num_head_channels=32, num_heads_upsample=-1,
        use_new_attention_order=False, use_scale_shift_norm=True, resblock_updown=False,
        class_cond=True, learn_sigma=True, conv_resample=False, dropout=0.1),
}

CLASSIFIER = dict(
    image_size=16, model_channels=32, num_res_blocks=1, channel_mult=(1, 2),
    attention_resolutions=(1, 2), num_heads=1, num_head_channels=16,
    use_scale_shift_norm=True, resblock_updown=True, out_channels=10)

T = np.array([0, 250, 600, 999])
Y = np.array([3, 0, 999, 41])


def _torch_unet(options):
  o = dict(options)
  learn_sigma, class_cond = o.pop("learn_sigma"), o.pop("class_cond")
  o.pop("dropout", None)  # eval mode: dropout does nothing
  return gd_unet.UNetModel(in_channels=3, out_channels=6 if learn_sigma else 3,
                           num_classes=1000 if class_cond else None, **o).eval()


def _config(options, **extra):
  o = dict(options, **extra)
  if "learn_sigma" in o:
    o["out_channels"] = 6 if o.pop("learn_sigma") else 3
  o.setdefault("dropout", 0.0)
  size = o["image_size"]
  return ml_collections.ConfigDict(dict(o, in_channels=3, num_classes=1000,
                                        image_shape=(size, size, 3)))


def _perturb(model, seed=0):
  """Every weight random (ADM zero-initialises its output layers): GroupNorm scales near 1,
  biases small, weights ~ N(0, 1/fan_in) so activations stay O(1)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1:
        is_norm = isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.GroupNorm)
        p.copy_((1.0 if is_norm and name.endswith("weight") else 0.0) + 0.1 * noise)
      elif name.endswith("positional_embedding"):
        p.copy_(noise)
      else:
        p.copy_(noise / p[0].numel() ** 0.5)
  return model


def _inputs(size, seed=0):
  x = np.random.default_rng(seed).standard_normal((len(T), 3, size, size)).astype(np.float32)
  return x, jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(T, jnp.int32)


_COMPILED = {}


def _apply(graphdef, params, *inputs, dropout_key=None):
  """`models.apply` jitted once per model and input kind, compiled without XLA's
  optimisations: the models are tiny, so the optimising compile would be most of the time."""
  args = (params, dropout_key, *inputs)
  signature = (graphdef, str(jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), args)))
  if signature not in _COMPILED:
    fn = jax.jit(lambda p, key, *a: models.apply(graphdef, p, *a, dropout_key=key))
    _COMPILED[signature] = fn.lower(*args).compile(
        compiler_options={"xla_backend_optimization_level": 0})
  return _COMPILED[signature](*args)


_PAIRS = {}


def _unet_pair(name):
  """(options, perturbed torch model, config, graphdef, ported params) of a small config."""
  if name not in _PAIRS:
    options = UNETS[name]
    torch_model = _perturb(_torch_unet(options))
    config = _config(options)
    graphdef, _ = models.abstract(network.UNetModel, config)
    params = port.to_params(torch_model.state_dict(), config)
    _PAIRS[name] = options, torch_model, config, graphdef, params
  return _PAIRS[name]


@pytest.fixture(params=list(UNETS))
def unet_pair(request):
  return _unet_pair(request.param)


def test_unet_matches_guided_diffusion(unet_pair):
  options, torch_model, config, graphdef, params = unet_pair
  x, x_nhwc, t = _inputs(options["image_size"])
  y = jnp.asarray(Y, jnp.int32) if options["class_cond"] else None
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x), torch.from_numpy(T),
                      torch.from_numpy(Y) if options["class_cond"] else None)
  ref = ref.numpy().transpose(0, 2, 3, 1)
  out = np.asarray(_apply(graphdef, params, x_nhwc, t, y))
  assert out.shape == ref.shape and out.shape[-1] == config.out_channels
  assert ref.std() > 0.1  # perturbed: the output depends on the weights
  # ε and (with learn_sigma) v: every channel, every timestep and label.
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_dropout_only_with_a_key():
  config = _config(UNETS["half_width_pool"])
  graphdef, params = models.abstract(
      lambda c, rngs: network.ResBlock(network.Layer("res", 32, 64), 256, c, jnp.float32,
                                       rngs=rngs), config)
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(0.2 * rng.standard_normal(a.shape), a.dtype), params)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 32)), jnp.float32)
  emb = jnp.asarray(rng.standard_normal((2, 256)), jnp.float32)
  run = jax.jit(lambda p, key: models.apply(graphdef, p, x, emb, key))
  plain = run(params, None)
  dropped = run(params, jax.random.key(4))
  assert float(jnp.max(jnp.abs(dropped - plain))) > 1e-3
  np.testing.assert_array_equal(dropped, run(params, jax.random.key(4)))


def test_port_round_trip_and_one_to_one(unet_pair):
  _, torch_model, config, _, params = unet_pair
  state = {k: v.numpy() for k, v in torch_model.state_dict().items()}
  table = port.name_map(config)
  assert list(table) == list(state)  # guided-diffusion's order, each name once
  assert len(set(table.values())) == len(table)
  back = port.to_state_dict(params, config)
  assert list(back) == list(state)
  for name, value in state.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.parametrize("pool", network.POOLS)
def test_classifier_matches_guided_diffusion(pool):
  torch_model = _perturb(gd_unet.EncoderUNetModel(in_channels=3, pool=pool, **CLASSIFIER))
  torch_model.eval()
  config = _config(CLASSIFIER, pool=pool)
  graphdef, _ = models.abstract(network.EncoderUNetModel, config)
  params = port.to_params(torch_model.state_dict(), config)
  x, x_nhwc, t = _inputs(CLASSIFIER["image_size"], seed=1)
  with torch.no_grad():
    ref = torch_model(torch.from_numpy(x), torch.from_numpy(T)).numpy()
  out = np.asarray(_apply(graphdef, params, x_nhwc, t))
  assert out.shape == (len(T), CLASSIFIER["out_channels"]) and ref.std() > 0.1
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_bfloat16_compute_stays_close():
  options, _, _, graphdef32, params = _unet_pair("half_width_pool")
  graphdef, _ = models.abstract(network.UNetModel, _config(options, dtype="bfloat16"))
  _, x_nhwc, t = _inputs(options["image_size"])
  y = jnp.asarray(Y, jnp.int32)
  out16 = _apply(graphdef, params, x_nhwc, t, y)
  out32 = _apply(graphdef32, params, x_nhwc, t, y)
  assert out16.dtype == jnp.float32
  err = float(jnp.max(jnp.abs(out16 - out32)) / jnp.max(jnp.abs(out32)))
  assert 0 < err < 0.1


def _abstract_shapes(model_cls, config):
  """Our param path → shape, from nnx.eval_shape (no weights made)."""
  leaves = jax.tree_util.tree_flatten_with_path(models.abstract(model_cls, config)[1])[0]
  return {tuple(k.key for k in path): leaf.shape for path, leaf in leaves}


def _check_full_size(preset):
  model_flags = presets.preset_flags(preset)
  model_args = {k: model_flags[k] for k in inspect.signature(script_util.create_model).parameters}
  classifier_args = {k: model_flags[k] for k in script_util.classifier_defaults()}
  for create, config, model_cls, args in [
      (script_util.create_model, presets.model_config(model_flags), network.UNetModel,
       model_args),
      (script_util.create_classifier, presets.classifier_config(model_flags),
       network.EncoderUNetModel, classifier_args)]:
    with torch.device("meta"):  # no memory, no init
      torch_model = create(**args)
    torch_shapes = {k: tuple(v.shape) for k, v in torch_model.state_dict().items()}
    # The same names in the same order with the same shapes, one to one with our params.
    assert list(port.expected_shapes(config).items()) == list(torch_shapes.items())
    ours = _abstract_shapes(model_cls, config)
    assert port.our_shapes(config) == ours
    assert len(set(port.name_map(config).values())) == len(ours)
    count = sum(math.prod(shape) for shape in ours.values())
    assert count == sum(p.numel() for p in torch_model.parameters())
    yield count


def test_full_size_64x64_names_shapes_and_count():
  assert list(_check_full_size("64x64")) == [295_904_454, 65_438_568]


@pytest.mark.slow
def test_full_size_256x256_names_shapes_and_count():
  assert list(_check_full_size("256x256")) == [553_838_086, 54_096_360]


@pytest.fixture(scope="module")
def small_state():
  options = UNETS["legacy_heads"]
  return {k: v.numpy() for k, v in _torch_unet(options).state_dict().items()}, _config(options)


def test_bad_state_dicts_name_the_key(small_state):
  state, config = small_state
  name = "input_blocks.1.0.in_layers.2.weight"
  missing = {k: v for k, v in state.items() if k != name}
  with pytest.raises(errors.InputError, match=name.replace(".", r"\.")) as info:
    port.to_params(missing, config)
  assert "\n" not in str(info.value)
  reshaped = dict(state, **{name: np.zeros((64, 32, 3, 3), np.float32)})
  with pytest.raises(errors.InputError, match=r"\(64, 32, 3, 3\).*\(32, 32, 3, 3\)") as info:
    port.to_params(reshaped, config)
  assert name in str(info.value) and "\n" not in str(info.value)
  extra = dict(state, **{"output_blocks.9.0.bias": np.zeros(3, np.float32)})
  with pytest.raises(errors.InputError, match=r"output_blocks\.9\.0\.bias"):
    port.to_params(extra, config)


class _NotWeights:
  """Pickling this needs the class: a file weights_only refuses."""

  def __init__(self):
    self.w = torch.zeros(2)


def test_read_torch_state_dict(tmp_path, small_state):
  state, _ = small_state
  good = tmp_path / "model.pt"
  torch.save({k: torch.from_numpy(v).half() for k, v in state.items()}, good)
  loaded = port.read_torch_state_dict(good)
  assert list(loaded) == list(state) and loaded["out.2.weight"].dtype == np.float32

  from safetensors import numpy as safetensors_numpy

  safe = tmp_path / "model.safetensors"
  safetensors_numpy.save_file(state, str(safe))
  np.testing.assert_array_equal(port.read_torch_state_dict(safe)["label_emb.weight"],
                                state["label_emb.weight"])

  code = tmp_path / "object.pt"
  torch.save(_NotWeights(), code, pickle_module=pickle)
  with pytest.raises(errors.InputError, match="more than weights") as info:
    port.read_torch_state_dict(code)
  assert "\n" not in str(info.value)
  truncated = tmp_path / "truncated.pt"
  truncated.write_bytes(good.read_bytes()[:1000])
  with pytest.raises(errors.InputError) as info:
    port.read_torch_state_dict(truncated)
  assert "\n" not in str(info.value)
  text = tmp_path / "notes.pt"
  text.write_text("not a checkpoint")
  with pytest.raises(errors.InputError):
    port.read_torch_state_dict(text)
  with pytest.raises(errors.MissingFileError):
    port.read_torch_state_dict(tmp_path / "absent.pt")


def _guided_diffusion_parse(argv):
  """guided-diffusion's own parser (classifier_sample.py's create_argparser)."""
  defaults = dict(clip_denoised=True, num_samples=10000, batch_size=16, use_ddim=False,
                  model_path="", classifier_path="", classifier_scale=1.0)
  defaults.update(script_util.model_and_diffusion_defaults())
  defaults.update(script_util.classifier_defaults())
  parser = argparse.ArgumentParser()
  script_util.add_dict_to_argparser(parser, defaults)
  return vars(parser.parse_args(argv))


def test_flags_parse_as_guided_diffusion():
  assert dict(presets.MODEL_DEFAULTS) == script_util.model_and_diffusion_defaults()
  assert dict(presets.CLASSIFIER_DEFAULTS) == script_util.classifier_defaults()
  for preset in presets.PRESETS.values():
    assert presets.parse_flags(preset.argv()) == _guided_diffusion_parse(preset.argv())
  argv = ["--class_cond", "yes", "--num_channels=96", "--dropout", "0.3", "--use_fp16", "F"]
  assert presets.parse_flags(argv) == _guided_diffusion_parse(argv)
  with pytest.raises(errors.InputError, match="--num_chanels"):
    presets.parse_flags(["--num_chanels", "3"])
  with pytest.raises(errors.InputError, match="--class_cond"):
    presets.parse_flags(["--class_cond", "maybe"])
  with pytest.raises(errors.InputError, match="--num_res_blocks"):
    presets.parse_flags(["--num_res_blocks"])


def test_presets_record_the_readme():
  f = {name: presets.preset_flags(name) for name in presets.PRESETS}
  scales = {k: v["classifier_scale"] for k, v in f.items()}
  assert scales == {"64x64": 1.0, "128x128": 0.5, "256x256": 1.0, "256x256_uncond": 10.0,
                    "512x512": 4.0}
  assert f["64x64"]["classifier_depth"] == 4 and f["128x128"]["classifier_depth"] == 2
  assert f["64x64"]["noise_schedule"] == "cosine" and f["512x512"]["noise_schedule"] == "linear"
  assert all(v["learn_sigma"] and v["diffusion_steps"] == 1000 for v in f.values())
  assert all(v["timestep_respacing"] == "250" for v in f.values())
  assert not f["256x256_uncond"]["class_cond"] and f["256x256"]["class_cond"]
  config = presets.model_config(f["512x512"])
  assert config.channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
  assert config.attention_resolutions == (16, 32, 64) and config.out_channels == 6
  config = presets.classifier_config(f["64x64"])
  assert (config.model_channels, config.num_res_blocks, config.pool) == (128, 4, "attention")
  assert config.image_shape == (64, 64, 3) and config.num_classes == presets.NUM_CLASSES
  with pytest.raises(errors.InputError, match="image_size 48"):
    presets.model_config(dict(image_size=48))
