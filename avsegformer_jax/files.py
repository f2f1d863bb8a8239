"""Workdir files on a local disk or in a bucket (`gs://...`), alike.

Why: on a TPU pod every host must reach the workdir, and the usual one is a
Cloud Storage URL. orbax (checkpoints) takes URLs itself; the logs,
results and visualisations we write go through
`etils.epath`, whose `gs://` backend is gcsfs (`pip install ".[gcs]"`;
the `tpu` extra has it). Bucket objects cannot be appended to, so a log
line there rewrites its file.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import time

from etils import epath

# Below this, a failed write is blamed on the disk (a checkpoint shard or a
# TFDS file can need tens of MB; nothing we write needs more at once).
FULL_BELOW = 64 << 20


def is_url(path) -> bool:
  return "://" in os.fspath(path)


def absolute(path) -> str:
  """An absolute local path, or the URL as given (abspath would turn
  `gs://b/run` into `./gs:/b/run`)."""
  p = os.fspath(path)
  return p if is_url(p) else os.path.abspath(os.path.expanduser(p))


def join(path, *names) -> str:
  return os.fspath(epath.Path(absolute(path)).joinpath(*names))


def makedirs(path) -> None:
  epath.Path(absolute(path)).mkdir(parents=True, exist_ok=True)


def make_output_dir(path, what: str) -> None:
  """makedirs for a folder the user named: one that cannot be made (a file
  in its path, no permission, a read-only disk) is bad input, reported
  before any work (not a traceback from wherever it is first written)."""
  try:
    makedirs(path)
  except OSError as e:
    from avsegformer_jax import errors  # pylint: disable=g-import-not-at-top
    raise errors.InputError(f"{path}: cannot create {what} ({e})") from None


def write_text(path, text: str) -> None:
  epath.Path(absolute(path)).write_text(text)


def read_text(path) -> str:
  return epath.Path(absolute(path)).read_text()


def append_line(path, line: str) -> None:
  """Appends `line` and a newline."""
  if not is_url(path):
    with open(path, "a") as f:
      f.write(line + "\n")
    return
  p = epath.Path(path)
  old = p.read_text() if p.exists() else ""
  p.write_text(old + line + "\n")


def write_png(path, image) -> None:
  """Saves a PIL image as PNG."""
  with epath.Path(absolute(path)).open("wb") as f:
    image.save(f, format="PNG")


def is_dir(path) -> bool:
  return epath.Path(absolute(path)).is_dir()


def exists(path) -> bool:
  return epath.Path(absolute(path)).exists()


def disk_full(path) -> str | None:
  """"N MiB free" when the local disk holding `path` has under FULL_BELOW
  left for us, else None (a URL, or a path on no disk, is never "full").

  Why: a full disk fails wherever the next write happens, as whatever that
  library raises (libsndfile's "System error.", array_record's, PIL's,
  TensorStore's); the free space names the cause for all of them at once.
  """
  if is_url(path):
    return None
  p = absolute(path)
  while not os.path.exists(p) and os.path.dirname(p) != p:
    p = os.path.dirname(p)
  try:
    free = shutil.disk_usage(p).free
  except OSError:
    return None
  return f"{free / (1 << 20):.1f} MiB free" if free < FULL_BELOW else None


LOCK_FILE = ".lock"
_HELD = set()                         # workdirs this process holds


@contextlib.contextmanager
def exclusive(workdir):
  """Holds WORKDIR/.lock while a run trains there. Two runs in one workdir
  (a job launched twice, a requeued job beside its old one) would write
  their checkpoints into each other's; the second one is refused, naming
  the first. An flock: the kernel releases it when its process ends,
  however it ends, so no stale lock is left behind. Not on a `gs://`
  workdir, or a file system without locks. Taken again inside itself (the
  demo's data, then training), it is the same hold."""
  path = None if is_url(workdir) else os.path.join(absolute(workdir),
                                                   LOCK_FILE)
  if path is None or path in _HELD:
    yield
    return
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    f.seek(0)
    holder = f.read().strip() or "a process"
    f.close()
    from avsegformer_jax import errors  # pylint: disable=g-import-not-at-top
    raise errors.InputError(
        f"{workdir}: another run trains there ({holder}); stop it, or give "
        "another --workdir") from None
  except OSError:                     # no locks on this file system
    f.close()
    yield
    return
  try:
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    _HELD.add(path)
    yield
  finally:
    _HELD.discard(path)
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()
