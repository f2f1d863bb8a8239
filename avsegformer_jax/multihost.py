"""Keeping several JAX processes (`jax.distributed`) in step without timing out,
and stopping them together on a preemption notice (`PreemptionNotice`).

On CPU, JAX's collectives (gloo) build a device group's communicator at the
group's first collective, and give up when a peer process joins more than 30 s
after the first one (`Gloo context initialization failed: DEADLINE_EXCEEDED:
GetKeyValue() timed out`; the limit is gloo's, not configurable from JAX).
Later collectives on the group wait for a late peer without that limit. Two
things make a peer that late: compiling the first train step (it took one
process of a two-process CPU run 30 s longer than the other on a loaded
2-core machine), and process-local work before a collective barrier (process 0
writing the demo dataset while the others wait in `sync_global_devices`).

So barriers go through the coordination service (a timeout we choose, no
collective), and `connect` builds the communicators of a mesh, and of the
per-device groups that `sync_global_devices` and orbax's barriers use, while
the processes are in step. On GPUs and TPUs it costs one tiny program.
"""
from __future__ import annotations

import contextlib
import itertools
import signal
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from avsegformer_jax import terminal

_BARRIERS = itertools.count()       # ids must be new; every process counts alike


def sync_processes(name: str, timeout_s: int = 3600) -> None:
  """Returns once every process has called it with the same `name`; waits up
  to `timeout_s` for the last one (a crashed process is reported sooner by
  the coordination service's heartbeat)."""
  if jax.process_count() > 1:
    ocp.multihost.get_barrier_sync_fn()(
        key=f"avsegformer_jax/{name}/{next(_BARRIERS)}",
        timeout_ms=timeout_s * 1000)


def on_process0(name: str, fn, timeout_s: int = 3600):
  """Runs `fn` on process 0 alone (writing the demo data, taking the workdir
  lock) while the others wait; returns its result there, None elsewhere.
  If it raises, every process raises, with its message (a ReportedError as
  it is, anything else named as process 0's failure): all of them stop
  with one line and meet at JAX's shutdown barrier, where the others would
  otherwise wait in their next barrier or collective until it timed out,
  and then be killed with a stack dump."""
  if jax.process_count() == 1:
    return fn()
  from avsegformer_jax import errors  # pylint: disable=g-import-not-at-top
  client = ocp.multihost.get_jax_distributed_client()
  key = f"avsegformer_jax/{name}/{next(_BARRIERS)}"
  if jax.process_index() == 0:
    try:
      out = fn()
    except BaseException as e:
      client.key_value_set(key, "failed:" + (
          str(e) if isinstance(e, errors.ReportedError) else
          f"process 0 stopped in {name}: {type(e).__name__}: {e} (its log "
          "has the rest)"))
      raise
    client.key_value_set(key, "done")
    return out
  outcome = client.blocking_key_value_get(key, timeout_s * 1000)
  if outcome.startswith("failed:"):
    raise errors.ReportedError(outcome[len("failed:"):])
  return None


def connect(mesh: Mesh) -> None:
  """Builds the communicators of `mesh` (all its devices: the steps' group)
  and of `sync_global_devices` now, with the processes in step; a no-op for
  one process."""
  if jax.process_count() == 1:
    return
  sync_processes("connect")
  spec = P(mesh.axis_names)              # [devices] over every mesh axis
  count = jax.jit(jax.shard_map(lambda x: lax.psum(x, mesh.axis_names),
                                mesh=mesh, in_specs=spec, out_specs=P()))
  ones = np.ones((len(mesh.local_devices),), np.int32)
  n = int(count(jax.make_array_from_process_local_data(
      NamedSharding(mesh, spec), ones, (mesh.size,)))[0])
  assert n == mesh.size, (n, mesh.size)
  multihost_utils.sync_global_devices("avsegformer_jax connect")


class PreemptionNotice:
  """A notice to save the step reached and stop: SIGTERM (what a spot or
  preemptible VM or a scheduler sends before it kills the job), a first
  Ctrl-C (SIGINT: an interactive run keeps its last step; a second one
  stops at once, KeyboardInterrupt) or SIGHUP (the terminal closed, e.g. a
  dropped ssh session: the run would die without a checkpoint), or a write
  to stdout / stderr that finds its reader gone (a hangup too: `terminal`).
  One process: a handler of ours notes it and `reached` is True from the
  next step on. Several (`jax.distributed`): JAX's preemption service
  catches SIGTERM on whichever host gets it and picks a step every process
  reaches, where `reached` is True on all of them; a Ctrl-C or SIGHUP there
  is passed to it as a SIGTERM of the process, so a launcher's Ctrl-C to
  every process, or one to any of them, stops them all at one step too."""

  def __init__(self):
    self.signum, self._previous = None, {}
    self._streams = contextlib.ExitStack()
    self._terminal = terminal.terminal_fds()
    self._service = False
    if threading.current_thread() is not threading.main_thread():
      return
    several = jax.process_count() > 1
    self._service = several and _preemption_service()
    if several and not self._service:
      return                       # nothing to pass a notice to
    for sig in ((signal.SIGINT, signal.SIGHUP) if several else
                (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)):
      self._previous[sig] = signal.signal(sig, self._notice)
    self._streams.enter_context(terminal.guarded_streams(self._output_lost))

  def _output_lost(self):
    """A write found its reader gone: as a hangup."""
    self._notice(signal.SIGHUP, None)

  def _notice(self, signum, frame):
    del frame
    if signum == signal.SIGHUP:
      terminal.to_devnull(self._terminal)
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      self.close()
      raise KeyboardInterrupt
    if self.signum is None:
      self.signum = signum
      if signum == signal.SIGINT:
        sys.stderr.write("\nCtrl-C: stopping after this step, with its "
                         "checkpoint saved (Ctrl-C again: stop now, without "
                         "it)\n")
        sys.stderr.flush()
      if jax.process_count() > 1:  # to JAX's handler (C++, not Python's)
        signal.raise_signal(signal.SIGTERM)

  def pending(self) -> bool:
    """Whether a notice came (one process; several agree on a step only in
    `reached`)."""
    return jax.process_count() == 1 and self.signum is not None

  @property
  def name(self) -> str:
    return {signal.SIGINT: "Ctrl-C",
            signal.SIGHUP: "SIGHUP"}.get(self.signum, "SIGTERM")

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:        # every process calls it every step
      if not self._service:
        return False                   # `jax_enable_preemption_service` off
      if multihost_utils.reached_preemption_sync_point(step):
        self.signum = self.signum or signal.SIGTERM   # ours, or another's
        return True
      return False
    return self.signum is not None

  def close(self):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}
    self._streams.close()


def _preemption_service() -> bool:
  """Whether `jax.distributed` runs JAX's preemption service (on unless
  `jax_enable_preemption_service` is off), whose handler takes SIGTERM."""
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return getattr(distributed.global_state, "preemption_sync_manager",
                 None) is not None
