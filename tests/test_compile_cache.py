"""compile_cache.enable: a second process loads what the first compiled."""
import os
import subprocess
import sys
import textwrap

from avsegformer_jax import compile_cache

_PROG = textwrap.dedent("""
    import sys
    from avsegformer_jax import compile_cache
    used = compile_cache.enable(sys.argv[1])
    import jax, jax.numpy as jnp
    hits = []
    jax.monitoring.register_event_listener(
        lambda name, **kw: hits.append(name) if "cache_hits" in name else None)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + x.sum())
    x = jnp.ones((64, 64))
    f.lower(x).compile()
    print(used, float(f(x)[0, 0]), len(hits))
""")


def _run(path, env_dir=None):
  env = {k: v for k, v in os.environ.items() if k != compile_cache.ENV}
  if env_dir is not None:
    env[compile_cache.ENV] = env_dir
  out = subprocess.run([sys.executable, "-c", _PROG, path], env=env,
                       capture_output=True, text=True, check=True)
  return out.stdout.split()


def test_second_run_reuses_the_cache(tmp_path):
  d = tmp_path / "xla"
  used, value, hits = _run(str(d))
  assert used == str(d) and hits == "0"
  files = sorted(os.listdir(d))
  assert files, "nothing was written to the cache"
  mtimes = {f: os.path.getmtime(d / f) for f in files}
  _, value2, hits2 = _run(str(d))
  # Same program, same key: read back, nothing new or rewritten.
  assert int(hits2) >= 1 and value2 == value
  assert sorted(os.listdir(d)) == files
  assert {f: os.path.getmtime(d / f) for f in files} == mtimes


def test_env_wins_and_empty_turns_off(tmp_path):
  env_dir = tmp_path / "from_env"
  used, _, _ = _run(str(tmp_path / "flag"), env_dir=str(env_dir))
  assert used == str(env_dir) and os.listdir(env_dir)
  assert not (tmp_path / "flag").exists()
  used, _, _ = _run("")
  assert used == "None"
