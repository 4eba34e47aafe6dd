from cfg_jax.app import xla_flags


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


CACHE_SCRIPT = """
import jax
from cfg_jax.app import startup
events = []
jax.monitoring.register_event_listener(lambda name, **kwargs: events.append(name))
startup.enable_compilation_cache()
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even this one
jax.jit(lambda x: x * 2 + 1)(1.0).block_until_ready()
print(jax.config.jax_compilation_cache_dir)
print("cache_hit" if "/jax/compilation_cache/cache_hits" in events else "compiled")
"""


def test_compiled_programs_persist_in_the_user_cache(tmp_path):
  import os
  import subprocess
  import sys

  def run(switch):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path), "CFG_JAX_COMPILATION_CACHE": switch}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    result = subprocess.run([sys.executable, "-c", CACHE_SCRIPT], capture_output=True,
                            text=True, env=env, check=True)
    return result.stdout.split()

  cache = tmp_path / "cfg_jax" / "jax"
  assert run("0") == ["None", "compiled"]
  assert not cache.exists()
  assert run("1") == [str(cache), "compiled"]
  assert any(cache.iterdir())
  assert run("1") == [str(cache), "cache_hit"]  # the next run reads it back
