from cfg_jax import xla_flags


def _configure(monkeypatch, xla_flags_env, platforms="cpu", initialized=False):
  from jax._src import xla_bridge

  monkeypatch.setenv("JAX_PLATFORMS", platforms)
  if xla_flags_env is None:
    monkeypatch.delenv("XLA_FLAGS", raising=False)
  else:
    monkeypatch.setenv("XLA_FLAGS", xla_flags_env)
  monkeypatch.setattr(xla_flags, "_jaxlib_version", lambda: (0, 10))
  monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: initialized)
  return xla_flags.configure({"xla_cpu_a": "", "xla_cpu_b": "1"})


def test_adds_flags_and_keeps_the_users(monkeypatch):
  assert _configure(monkeypatch, None) == "--xla_cpu_a= --xla_cpu_b=1"
  # A flag the user set keeps the user's value; other user flags stay in front.
  assert (_configure(monkeypatch, "--xla_cpu_a=reduce --xla_dump_to=/tmp/d")
          == "--xla_cpu_a=reduce --xla_dump_to=/tmp/d --xla_cpu_b=1")


def test_leaves_other_backends_and_a_started_backend_alone(monkeypatch):
  assert _configure(monkeypatch, "--x=1", platforms="cuda") == "--x=1"
  assert _configure(monkeypatch, "--x=1", initialized=True) == "--x=1"
