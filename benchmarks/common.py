"""Shared timing and memory helpers for the benchmarks.

Timings call `jax.block_until_ready` on every result so asynchronous dispatch
cannot hide work; compile time is measured with the AOT API (lower + compile)
so it never mixes with run time.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import resource
import sys
import time

import jax
from jax.extend import core as jex_core
import numpy as np


def device_info() -> dict:
  d = jax.devices()[0]
  info = {"platform": d.platform, "device_kind": d.device_kind,
          "num_devices": jax.device_count(), "jax": jax.__version__,
          "host": platform.node(), "cpu_count": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          # Set: compile times may be loads from JAX's persistent cache.
          "compilation_cache_dir": jax.config.jax_compilation_cache_dir}
  if d.platform == "cpu":
    info["cpu_threads"] = _cpu_threads()
  return info


def _cpu_threads():
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:       # macOS
    return os.cpu_count()


def peak_memory_bytes() -> tuple[int, str]:
  """(peak bytes, what was measured): the accelerator allocator's peak where
  it reports one, else this process's peak resident set (both monotonic over
  the process's life, so isolate runs in subprocesses to compare them)."""
  stats = None
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:            # noqa: BLE001  (CPU clients may raise)
    stats = None
  if stats and stats.get("peak_bytes_in_use"):
    return int(stats["peak_bytes_in_use"]), "device_peak_bytes_in_use"
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  scale = 1 if sys.platform == "darwin" else 1024          # Linux: KiB
  return int(rss * scale), "host_peak_rss"


def aot_compile(jitted, *args, times: dict | None = None):
  """(compiled executable, seconds to trace + lower + compile, matmul FLOPs
  per device of one call: see `matmul_flops`). The arguments may be
  `jax.ShapeDtypeStruct`s: nothing is run. `times`, if given, receives
  `xla_s`: XLA's compiler alone, without tracing and lowering (on a GPU
  with the device, autotuning included)."""
  t = time.perf_counter()
  lowered = (traced := jitted.trace(*args)).lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  if times is not None:
    times["xla_s"] = t2 - t1
  return compiled, t2 - t, matmul_flops(traced.jaxpr)


def memory_plan(compiled) -> dict:
  """XLA's buffer assignment for one call, per device, in bytes.

  `total` = arguments + outputs - donated (aliased) outputs + temporaries:
  XLA packs every temporary into one block sized by liveness, so this is
  what the executable holds at once. Known at compile time, so it sizes a
  step that cannot be run here; another backend fuses differently and so
  plans other temporaries: a plan, not a measurement. (XLA's own
  `peak_memory_in_bytes` leaves the temporaries out on CPU.)
  """
  m = compiled.memory_analysis()
  if m is None:                                  # some backends give none
    return {}
  plan = {k: int(getattr(m, f"{k}_size_in_bytes"))
          for k in ("argument", "output", "alias", "temp")}
  plan["total"] = (plan["argument"] + plan["output"] - plan["alias"]
                   + plan["temp"])
  return plan


def matmul_flops(jaxpr) -> float:
  """2 x multiply-adds of every dot_general and convolution in a jaxpr.

  Counted on the jaxpr, not with XLA's cost analysis, which counts a
  while-loop body once: with `scan_layers` it saw one of PVTv2-B5's 40
  stage-3 blocks and one of each 6-layer stack (S4 PVTv2-B5 224 eval step:
  266 GFLOP reported, 487 counted here, 116 in the backbone alone). Scan bodies count
  `length` times, cond the costliest branch, a shard_map body once (per
  device). Elementwise work is left out, as model-FLOP utilisation does.
  """
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)              # ClosedJaxpr -> Jaxpr
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      (lc, _), _ = eqn.params["dimension_numbers"]
      k = np.prod([eqn.invars[0].aval.shape[d] for d in lc])
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * k
    elif name == "conv_general_dilated":
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params["dimension_numbers"].rhs_spec   # (O, I, *spatial)
      per_out = np.prod([rhs[d] for d in spec[1:]])     # I/groups x window
      total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * per_out
    times = eqn.params.get("length", 1) if name == "scan" else 1
    for v in eqn.params.values():
      subs = v if isinstance(v, (list, tuple)) else [v]
      counts = [matmul_flops(j) for j in subs
                if isinstance(j, (jex_core.Jaxpr, jex_core.ClosedJaxpr))]
      if counts:                # cond: one branch runs; others: each once
        total += times * (max(counts) if name == "cond" else sum(counts))
  return float(total)


# Processes sharing one device (`benchmarks.model --jobs N`, or the
# concurrent sections of run_gpu.sh) coordinate through the lock file named
# by $BENCH_DEVICE_LOCK: compiles overlap, but XLA:GPU autotunes on the
# device while it compiles, so a process times its steps only when it holds
# the lock and no other process is compiling (a marker file per compiling
# process in <lock>.d; markers of dead processes are ignored).


@contextlib.contextmanager
def _locked(path):
  with open(path, "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:      # alive, another user's
    pass
  return True


@contextlib.contextmanager
def compiling():
  """Mark this process as compiling (see above); no-op without the lock."""
  path = os.environ.get("BENCH_DEVICE_LOCK")
  if not path:
    yield
    return
  os.makedirs(path + ".d", exist_ok=True)
  marker = os.path.join(path + ".d", str(os.getpid()))
  with _locked(path):          # never starts while another process times
    open(marker, "w").close()
  try:
    yield
  finally:
    os.remove(marker)


@contextlib.contextmanager
def device_to_itself(poll_s: float = 0.5):
  """Hold the device for timing: the lock, once no other process compiles."""
  path = os.environ.get("BENCH_DEVICE_LOCK")
  if not path:
    yield
    return
  with _locked(path):
    while any(_alive(int(m)) for m in _markers(path)
              if int(m) != os.getpid()):
      time.sleep(poll_s)
    yield


def _markers(path):
  try:
    return [m for m in os.listdir(path + ".d") if m.isdigit()]
  except FileNotFoundError:
    return []


def timed(fn, steps: int):
  """Run fn() `steps` times, blocking on each result; returns (times, last)."""
  times, out = [], None
  for _ in range(steps):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return times, out


def summary(times) -> dict:
  a = np.asarray(times, np.float64)
  return {"median_s": float(np.median(a)), "min_s": float(a.min()),
          "mean_s": float(a.mean()), "n": int(a.size)}


def write_json(path: str, obj) -> None:
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)


def fmt_table(rows, cols) -> str:
  """Plain fixed-width table: cols = [(header, key, format)]."""
  cells = [[h for h, _, _ in cols]]
  for r in rows:
    line = []
    for _, k, f in cols:
      v = r.get(k)
      line.append("-" if v is None else (f.format(v) if f else str(v)))
    cells.append(line)
  widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
  out = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in cells]
  out.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(out)


def bool_list(s):
  """--scan false,true -> [False, True] (argparse type)."""
  out = []
  for v in s.split(","):
    v = v.strip().lower()
    if v not in ("true", "false", "1", "0"):
      raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")
    out.append(v in ("true", "1"))
  return out


def remat_list(s):
  """--remat false,true,dots: off, full, or a `layers.REMAT_POLICIES` name."""
  out = []
  for v in s.split(","):
    v = v.strip().lower()
    out += ["dots"] if v == "dots" else [True] if v == "full" else \
        bool_list(v)
  return out
