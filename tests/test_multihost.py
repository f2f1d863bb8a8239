"""Two JAX processes (2 CPU devices each, gloo collectives) that fall more
than gloo's 30 s apart, as a slow compile or process-local work makes them:
the barrier waits, and after `connect` the first step's collective waits too
(without it the step fails: "Gloo context initialization failed")."""
import os
import socket
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LATE_S = 40             # well past gloo's 30 s limit on building a communicator

SCRIPT = textwrap.dedent("""
    import sys, time
    import jax, numpy as np
    from jax import lax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec as P
    pid, coordinator, late = int(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    jax.distributed.initialize(coordinator, 2, pid)
    from avsegformer_jax import multihost, train
    mesh = train.make_mesh()     # the backend up (its start waits for all)
    if pid == 0:
      time.sleep(late)           # process 0 writing the demo data
    multihost.sync_processes("data")
    multihost.connect(mesh)
    if pid == 1:
      time.sleep(late)           # process 1 compiling its first step longer
    step = jax.jit(jax.shard_map(lambda x: lax.psum(x * x, "data"), mesh=mesh,
                                 in_specs=P("data"), out_specs=P()))
    x = jax.make_array_from_process_local_data(
        NamedSharding(mesh, P("data")), np.arange(2.0) + 2 * pid, (4,))
    total = float(step(x)[0])
    multihost_utils.sync_global_devices("after")
    print("total", total, flush=True)
""")


def test_processes_far_apart_wait_for_each_other(tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    coordinator = f"localhost:{s.getsockname()[1]}"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = []
  for i in range(2):
    with open(tmp_path / f"{i}.log", "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-c", SCRIPT, str(i), coordinator, str(LATE_S)],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=600)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, p in enumerate(procs):
    err = (tmp_path / f"{i}.log").read_text()
    assert p.returncode == 0, f"process {i}: {err[-3000:]}"
    # (gloo prints its connections to stdout first)
    assert outs[i].splitlines()[-1] == "total 14.0", outs[i]   # 0+1+4+9
