import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cfg_jax import checkpoints, data, distributed, schedules
from cfg_jax.train import classifier, denoiser, loop


def _run_steps(config, split, devices, num_steps=3):
  mesh = distributed.data_mesh(devices)
  graphdef, params = denoiser.create_denoiser(config, 0)
  tx = loop.make_optimizer(**config.optimizer)
  state = distributed.replicate_tree(loop.init_state(params, tx, with_ema=True), mesh)
  step = loop.jit_data_parallel(
      denoiser.make_train_step(graphdef, tx, schedules.from_config(config.diffusion), config), mesh)
  losses = []
  for batch in [b for _, b in zip(range(num_steps), data.batches(split, 16, seed=0))]:
    state, metrics = step(state, loop.shard_batch(batch, mesh), jax.random.key(0))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state), losses


def test_eight_devices_match_one(tiny_config, digits_train):
  assert jax.device_count() == 8, "conftest.py asks XLA for eight host devices"
  one, losses_one = _run_steps(tiny_config, digits_train, jax.devices()[:1])
  eight, losses_eight = _run_steps(tiny_config, digits_train, jax.devices())
  np.testing.assert_allclose(losses_one, losses_eight, rtol=1e-5)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         one.params, eight.params)
  assert int(eight.step) == 3
  # The EMA moved towards the new parameters, but not all the way.
  _, init = denoiser.create_denoiser(tiny_config, 0)
  leaf = lambda tree: np.asarray(tree["encoder"]["input_conv"]["kernel"])
  assert 0 < np.abs(leaf(eight.ema_params) - leaf(init)).max() < np.abs(
      leaf(eight.params) - leaf(init)).max()


def test_training_is_deterministic(tiny_config, digits_train):
  a, losses_a = _run_steps(tiny_config, digits_train, jax.devices()[:1], 2)
  b, losses_b = _run_steps(tiny_config, digits_train, jax.devices()[:1], 2)
  assert losses_a == losses_b
  jax.tree_util.tree_map(np.testing.assert_array_equal, a.params, b.params)


def test_batch_size_must_divide_over_devices(tiny_config):
  with pytest.raises(ValueError, match="divisible by the 8 devices"):
    loop.check_batch_size(12, distributed.data_mesh())


def test_learning_rate_schedules():
  constant = loop.learning_rate_schedule(1e-3, 10)
  cosine = loop.learning_rate_schedule(1e-3, 10, "cosine", num_steps=110)
  for schedule in (constant, cosine):
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0, 5e-4, 1e-3],
                               rtol=1e-6)
  np.testing.assert_allclose(constant(110), 1e-3, rtol=1e-6)
  # Half way through the decay, cos(π/2): half the peak; at the end, 0.
  np.testing.assert_allclose([cosine(60), cosine(110)], [5e-4, 0.0], atol=1e-9)
  with pytest.raises(ValueError, match="num_steps > warmup_steps"):
    loop.learning_rate_schedule(1e-3, 10, "cosine", num_steps=10)
  with pytest.raises(ValueError, match="Unknown learning-rate decay"):
    loop.learning_rate_schedule(1e-3, 10, "linear")


def test_cosine_runs_resume_only_with_the_same_schedule():
  from configs import digits

  config = digits.get_config()
  config.optimizer.decay = "cosine"
  saved = config.to_dict()
  longer = digits.get_config()
  longer.optimizer.decay = "cosine"
  longer.train.num_steps *= 2
  sections = denoiser.state_sections(longer)
  assert {"optimizer", "train.num_steps"} <= set(sections)
  steps = config.train.num_steps
  with pytest.raises(checkpoints.CheckpointError,
                     match=f"train.num_steps: saved {steps}, now {2 * steps}"):
    checkpoints.check_compatible(saved, longer.to_dict(), sections)
  constant = digits.get_config()
  constant.optimizer.decay = constant.classifier.optimizer.decay = "constant"
  assert denoiser.state_sections(constant) == denoiser.STATE_SECTIONS
  assert "classifier.num_steps" not in classifier.state_sections(constant)
  constant.classifier.optimizer.decay = "cosine"
  assert "classifier.num_steps" in classifier.state_sections(constant)


def test_ema_update_warmup():
  ema = loop.ema_update({"w": jnp.zeros(())}, {"w": jnp.ones(())}, step=0, decay=0.999)
  assert float(ema["w"]) == pytest.approx(1 - 0.1)  # (1 + 0) / (10 + 0) kept of the old


def _run_diverging(tmp_path, digits_train, *, log_every, checkpoint_every, keep_steps=()):
  """Runs a step whose loss is NaN from step 3 on; returns the checkpoint manager."""
  from cfg_jax import checkpoints

  mesh = distributed.data_mesh(jax.devices()[:1])
  state = loop.TrainState(jnp.zeros((), jnp.int32), {"w": jnp.ones(())}, None, ())

  def diverging_step(state, batch, key):
    loss = jnp.where(state.step >= 2, jnp.nan, 1.0)
    return state.replace(step=state.step + 1), {"loss": loss}

  mngr = checkpoints.manager(str(tmp_path / "ckpt"), keep_steps=keep_steps)
  writer = loop.MetricWriter(str(tmp_path), "test")
  try:
    with pytest.raises(loop.TrainingError, match="non-finite metrics.*at step 3; lower the"):
      loop.run_loop(state=state, train_step=jax.jit(diverging_step), mesh=mesh,
                    batches=data.batches(digits_train, 8, 0), key=jax.random.key(0),
                    num_steps=10, manager=mngr, config_dict={}, writer=writer,
                    log_every=log_every, checkpoint_every=checkpoint_every, batch_size=8,
                    description="test", keep_steps=keep_steps)
  finally:
    writer.close()
  mngr.wait_until_finished()
  return mngr


def test_nan_loss_stops_training_before_a_checkpoint(tmp_path, digits_train):
  mngr = _run_diverging(tmp_path, digits_train, log_every=1, checkpoint_every=2)
  assert mngr.all_steps() == [2]  # the good step-2 checkpoint survives; no NaN state saved


def test_nan_at_a_kept_step_is_not_saved_between_log_steps(tmp_path, digits_train):
  """A `keep_steps` save falls between log and checkpoint steps: its metrics are checked too."""
  mngr = _run_diverging(tmp_path, digits_train, log_every=5, checkpoint_every=5,
                        keep_steps=(3,))
  assert mngr.all_steps() == []  # the NaN state of kept step 3 was never saved


def test_train_step_traces_once(tiny_config, digits_train):
  """Steps after the first reuse the compiled step: no silent retrace per step."""
  import chex

  mesh = distributed.data_mesh(jax.devices()[:1])
  graphdef, params = denoiser.create_denoiser(tiny_config, 0)
  tx = loop.make_optimizer(**tiny_config.optimizer)
  step_fn = denoiser.make_train_step(
      graphdef, tx, schedules.from_config(tiny_config.diffusion), tiny_config)
  chex.clear_trace_counter()
  step = loop.jit_data_parallel(chex.assert_max_traces(step_fn, n=1), mesh)
  state = distributed.replicate_tree(loop.init_state(params, tx, with_ema=True), mesh)
  for batch in [b for _, b in zip(range(3), data.batches(digits_train, 16, seed=0))]:
    state, _ = step(state, loop.shard_batch(batch, mesh), jax.random.key(0))
  assert int(state.step) == 3
