"""Losing the terminal or the reader of our output without losing the work.

A closed terminal window, a dropped ssh session or the end of the
`gcloud ... ssh --worker=all` session a pod runs in: the process gets SIGHUP
(a terminal) or finds its stdout / stderr pipe closed, and its next print,
log line or progress bar raises (EIO, EPIPE). Training saves its step and
stops then (`multihost.PreemptionNotice`); `prepare` and `predict`, which
have nothing to save midway, go on to the end (`survive_hangup`), as under
`nohup`.
"""
from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
import threading


def terminal_fds() -> list[int]:
  """stdout and stderr where they are a terminal. Ask before a hangup: a
  hung-up terminal no longer answers `isatty`."""
  out = []
  for fd in (1, 2):
    try:
      if os.isatty(fd):
        out.append(fd)
    except OSError:
      pass
  return out


def to_devnull(fds) -> None:
  """Points `fds` at /dev/null: every later write, from Python or from
  C++, succeeds."""
  null = os.open(os.devnull, os.O_WRONLY)
  for fd in fds:
    os.dup2(null, fd)
  os.close(null)


class GuardedStream:
  """sys.stdout / sys.stderr: where the reader went away (EPIPE: a closed
  pipe or ssh channel; EIO: a hung-up terminal) a write raised in whichever
  print, log line or progress bar came next. Now the stream's descriptor
  goes to /dev/null (`to_devnull`), the write is done again there, and
  `lost()` (if given) is called once."""

  def __init__(self, stream, lost=None):
    self._stream, self._lost = stream, lost

  def _guard(self, fn, *args):
    try:
      return fn(*args)
    except OSError as e:
      if e.errno not in (errno.EPIPE, errno.EIO):
        raise
      to_devnull([self._stream.fileno()])
      lost, self._lost = self._lost, None
      if lost is not None:
        lost()
      return fn(*args)

  def write(self, text):
    return self._guard(self._stream.write, text)

  def flush(self):
    return self._guard(self._stream.flush)

  def __getattr__(self, name):
    return getattr(self._stream, name)


@contextlib.contextmanager
def guarded_streams(lost=None):
  """sys.stdout and sys.stderr as `GuardedStream`s while inside."""
  before = sys.stdout, sys.stderr
  sys.stdout, sys.stderr = (GuardedStream(x, lost) for x in before)
  try:
    yield
  finally:
    sys.stdout, sys.stderr = before


@contextlib.contextmanager
def survive_hangup():
  """Inside, a hangup (SIGHUP, or a write finding its reader gone) sends
  the output that went to the lost terminal or pipe to /dev/null and the
  work goes on (an hour-long AVSS `prepare` died, and started over when
  run again). Ctrl-C and SIGTERM still stop it."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  terminal = terminal_fds()
  previous = signal.signal(signal.SIGHUP,
                           lambda signum, frame: to_devnull(terminal))
  try:
    with guarded_streams():
      yield
  finally:
    signal.signal(signal.SIGHUP, previous)
