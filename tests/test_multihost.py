"""Two JAX processes (2 CPU devices each, gloo collectives) that fall more
than gloo's 30 s apart, as a slow compile or process-local work makes them:
the barrier waits, and after `connect` the first step's collective waits too
(without it the step fails: "Gloo context initialization failed")."""
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

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


def _two_processes(tmp_path, script, *args, timeout=600):
  """Runs `script PID COORDINATOR ARGS...` as processes 0 and 1 of one JAX
  cluster; returns their exit statuses (None: killed at `timeout`),
  stdouts and stderrs."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    coordinator = f"localhost:{s.getsockname()[1]}"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  procs = []
  for i in range(2):
    with open(tmp_path / f"{i}.log", "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-c", script, str(i), coordinator, *map(str, args)],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=log, text=True))
  outs = ["", ""]
  deadline = time.time() + timeout
  try:
    for i, p in enumerate(procs):
      try:
        outs[i] = p.communicate(timeout=max(1, deadline - time.time()))[0]
      except subprocess.TimeoutExpired:
        break
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
        p.returncode = None
  return ([p.returncode for p in procs], outs,
          [(tmp_path / f"{i}.log").read_text() for i in range(2)])


def test_processes_far_apart_wait_for_each_other(tmp_path):
  codes, outs, errs = _two_processes(tmp_path, SCRIPT, LATE_S)
  for i, code in enumerate(codes):
    assert code == 0, f"process {i}: {errs[i][-3000:]}"
    # (gloo prints its connections to stdout first)
    assert outs[i].splitlines()[-1] == "total 14.0", outs[i]   # 0+1+4+9


ON_PROCESS0 = textwrap.dedent("""
    import sys
    import jax
    pid, coordinator = int(sys.argv[1]), sys.argv[2]
    jax.distributed.initialize(coordinator, 2, pid)
    from avsegformer_jax import errors, multihost
    print("result", multihost.on_process0("a", lambda: pid + 10), flush=True)
    def fail():
      raise OSError(28, "No space left on device")
    try:
      multihost.on_process0("the demo data", fail)
    except errors.ReportedError as e:
      print("reported", e, flush=True)
    except OSError as e:
      print("raised", type(e).__name__, flush=True)
    def refuse():
      raise errors.InputError("W: another run trains there")
    try:
      multihost.on_process0("lock", refuse)
    except errors.ReportedError as e:
      print("reported", type(e).__name__, e, flush=True)
""")


def test_what_process_0_alone_does_ends_alike_everywhere(tmp_path):
  """Its result stays on process 0; its failure is every process's, so
  none waits for it in a later barrier."""
  codes, outs, errs = _two_processes(tmp_path, ON_PROCESS0, timeout=120)
  assert codes == [0, 0], errs
  assert outs[0].splitlines()[-3:] == [
      "result 10", "raised OSError",
      "reported InputError W: another run trains there"]
  assert outs[1].splitlines()[-3:] == [
      "result None",
      "reported process 0 stopped in the demo data: OSError: [Errno 28] No "
      "space left on device (its log has the rest)",
      "reported ReportedError W: another run trains there"]


def test_ctrl_c_once_stops_at_the_next_step_twice_at_once():
  """One process: a first Ctrl-C is a notice like SIGTERM (the loop saves
  its step); a second one is KeyboardInterrupt, and the handlers are the
  ones before again."""
  import signal  # pylint: disable=g-import-not-at-top
  from avsegformer_jax import multihost  # pylint: disable=g-import-not-at-top
  before = signal.getsignal(signal.SIGINT)
  notice = multihost.PreemptionNotice()
  try:
    assert not notice.reached(1)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.1)                         # (delivered between bytecodes)
    assert notice.reached(2) and notice.name == "Ctrl-C"
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
    assert signal.getsignal(signal.SIGINT) is before
  finally:
    notice.close()
  for sig, name in ((signal.SIGTERM, "SIGTERM"), (signal.SIGHUP, "SIGHUP")):
    notice = multihost.PreemptionNotice()
    os.kill(os.getpid(), sig)
    time.sleep(0.1)
    assert notice.reached(1) and notice.name == name
    notice.close()


HANGUP = textwrap.dedent("""
    import fcntl, os, signal, sys, termios, time
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)   # the pty: this session's terminal
    from avsegformer_jax import multihost
    notice = multihost.PreemptionNotice()
    print("ready", flush=True)
    deadline = time.time() + 60   # until the test closes the terminal
    while notice.signum is None and time.time() < deadline:
      time.sleep(0.05)
    with open(sys.argv[1], "w") as f:
      f.write(f"{notice.name} {notice.reached(1)} {os.isatty(1)} "
              f"{os.isatty(2)}")
    print("a line into the closed terminal", flush=True)
    sys.stderr.write("and one into stderr\\n")
    sys.stderr.flush()
    """)


def test_a_terminal_hangup_is_a_notice_and_writes_no_longer_fail(tmp_path):
  """SIGHUP (a closed terminal, a dropped ssh session) killed a run
  without saving; now it is a notice. After it, writes to the hung-up
  terminal failed (EIO) and would end the run before it saved: the streams
  that were the terminal go to /dev/null, so the process writes on and
  exits normally."""
  import pty  # pylint: disable=g-import-not-at-top
  out = tmp_path / "out"
  fd, tty = pty.openpty()
  proc = subprocess.Popen([sys.executable, "-c", HANGUP, str(out)], cwd=ROOT,
                          stdin=tty, stdout=tty, stderr=tty,
                          start_new_session=True)
  os.close(tty)
  text = b""
  while b"ready" not in text:
    text += os.read(fd, 1024)
  os.close(fd)               # hangs the terminal up: SIGHUP to the child
  assert proc.wait(timeout=120) == 0
  assert out.read_text() == "SIGHUP True False False"


LOST_OUTPUT = textwrap.dedent("""
    import os, sys, time
    from tqdm import tqdm
    from avsegformer_jax import multihost
    before = sys.stdout, sys.stderr
    notice = multihost.PreemptionNotice()
    bar = tqdm(total=10 ** 9, file=sys.stderr, mininterval=0)
    print("ready", flush=True)
    deadline = time.time() + 60   # until the test closes the pipes
    while notice.signum is None and time.time() < deadline:
      print("a line", flush=True)
      bar.update(1)
      time.sleep(0.01)
    print("after", flush=True)
    tqdm.write("after")
    bar.close()
    notice.close()
    with open(sys.argv[1], "w") as f:
      f.write(f"{notice.name} {notice.reached(1)} "
              f"{(sys.stdout, sys.stderr) == before}")
    """)


def test_a_closed_output_pipe_is_a_notice_and_writes_go_on(tmp_path):
  """The ssh session that `gcloud ... ssh --worker=all` runs training in
  closes (the laptop's Ctrl-C, a dropped connection): the next print, log
  line or bar update raised BrokenPipeError and the run ended without
  saving. Now the streams go to /dev/null and the notice comes as for a
  hangup; the handlers and streams are the ones before after `close`."""
  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-c", LOST_OUTPUT, str(out)],
                          cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
  assert proc.stdout.readline() == b"ready\n"
  proc.stdout.close()
  proc.stderr.close()
  assert proc.wait(timeout=120) == 0
  assert out.read_text() == "SIGHUP True True"
