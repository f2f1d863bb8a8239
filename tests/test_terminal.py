"""terminal.py: prepare and predict go on to the end when their terminal or
the reader of their output goes away (training saves and stops instead:
tests/test_multihost.py)."""
import os
import pty
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORK = textwrap.dedent("""
    import os, sys, time
    from avsegformer_jax import terminal
    with terminal.survive_hangup():
      print("ready", flush=True)
      deadline = time.time() + 60     # until the test closes the terminal
      while os.isatty(1) and time.time() < deadline:
        time.sleep(0.05)
      for i in range(200):            # the work goes on, printing
        print("line", i, flush=True)
        sys.stderr.write("and stderr\\\\n")
    with open(sys.argv[1], "w") as f:
      f.write(f"done {os.isatty(1)}")
    """)


def _in_pty(argv, until: bytes, **kwargs):
  """Runs argv with a pty as its controlling terminal, reads until `until`,
  then closes the pty (a hangup: SIGHUP to the process); its exit status
  and what it printed before."""
  fd, tty = pty.openpty()
  proc = subprocess.Popen(argv, stdin=tty, stdout=tty, stderr=tty,
                          start_new_session=True, **kwargs)
  os.close(tty)
  text = b""
  while until not in text:
    try:
      chunk = os.read(fd, 4096)
    except OSError:
      break
    if not chunk:
      break
    text += chunk
  os.close(fd)
  return proc.wait(timeout=600), text


def test_a_hangup_leaves_the_work_going(tmp_path):
  """SIGHUP killed it (default action); now the output goes to /dev/null
  and the work ends normally."""
  out = tmp_path / "out"
  code = "import fcntl, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n" + WORK
  status, text = _in_pty([sys.executable, "-c", code, str(out)], b"ready",
                         cwd=ROOT)
  assert b"ready" in text
  assert status == 0 and out.read_text() == "done False"


def test_a_closed_output_pipe_leaves_the_work_going(tmp_path):
  """Writes into a pipe nobody reads raised BrokenPipeError."""
  out = tmp_path / "out"
  proc = subprocess.Popen([sys.executable, "-c", WORK, str(out)], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  assert proc.stdout.readline() == b"ready\n"
  proc.stdout.close()
  proc.stderr.close()
  assert proc.wait(timeout=120) == 0
  assert out.read_text() == "done False"


def test_prepare_survives_its_terminal(tmp_path):
  """`prepare` (an hour for AVSS) hung up mid-build: it used to die and
  start over when run again; now it finishes the dataset."""
  raw, data = tmp_path / "raw", tmp_path / "tfds"
  subprocess.run([sys.executable, "-m", "datasets.avsbench.synthesize",
                  "--task", "s4", "--out", str(raw), "--videos", "40"],
                 cwd=ROOT, check=True, capture_output=True)
  # Its terminal: the pty (python -c sets it, then runs prepare's main).
  code = ("import fcntl, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0)"
          "\nfrom datasets.avsbench import prepare\nprepare.main(sys.argv[1:])")
  status, text = _in_pty(
      [sys.executable, "-c", code, "--config=s4", f"--manual_dir={raw}",
       f"--data_dir={data}"], b"Downloading and preparing", cwd=ROOT)
  assert b"Downloading and preparing" in text and b"prepared" not in text
  assert status == 0, text[-2000:]
  from datasets.avsbench import prepare  # pylint: disable=g-import-not-at-top
  assert prepare.is_prepared("s4", str(data))
