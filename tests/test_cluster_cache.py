"""cluster_cache.py (the test clusters' XLA cache): both processes of a
localhost JAX cluster write their own entries, so a second run of the
multi-process tests finds process 1's programs too."""
import math
import os
import socket
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[3])
    import cluster_cache
    import jax, jax.numpy as jnp
    assert cluster_cache.enable()
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.distributed.initialize(sys.argv[2], 2, int(sys.argv[1]))
    f = jax.jit(lambda x: jnp.sin(x) * 3)          # on this process's device
    print(float(f(jnp.ones(()))))
""")


def test_both_processes_write_their_entries(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    coordinator = f"localhost:{s.getsockname()[1]}"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / "cache"),
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  procs = [subprocess.Popen(
      [sys.executable, "-c", SCRIPT, str(i), coordinator, TESTS], env=env,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    assert abs(float(out.split()[-1]) - 3 * math.sin(1)) < 1e-6, out
  # One entry per process: on CPU the key holds the process's own devices,
  # and JAX alone writes process 0's only.
  entries = [f for f in os.listdir(tmp_path / "cache")
             if f.startswith("jit__lambda-")]
  assert len(entries) == 2, sorted(os.listdir(tmp_path / "cache"))
