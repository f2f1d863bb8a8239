"""A TPU step's time by XLA:TPU's own cost model, read from the optimized HLO
of a deviceless compile (`benchmarks/plan.py --target v5e --roofline`).

Why: with no TPU lent, nothing here can time a TPU step, and XLA:TPU's
module-level `optimal_seconds` is negative for these programs. But XLA:TPU
writes, in each kernel's backend config, the `estimated_cycles` its cost
model gave the kernel when it chose tilings and fusions (MXU passes, vector
work, HBM and VMEM transfers, in TensorCore cycles). Their sum, times the
trip counts of the while loops around them (scanned layers), over the chip's
clock, is the compiler's own estimate of the step: a model, not a
measurement, but the one that knows XLA:TPU's layouts (minor dimensions
padded to 128 lanes) and which buffers it keeps in VMEM.

Kernels it gives no estimate (the gathers of "gather4"/"fused" MSDA, sorts,
scatter-adds) are charged their operands and results in tiled layouts over
HBM bandwidth, reported apart (`unestimated_s`): a lower bound for them, so
the total is optimistic where that column is large. Asynchronous copies and
slices (DMAs between HBM and VMEM that XLA schedules beside compute) are
charged the same way to `async_s`, outside the total.

Calibration, one bfloat16 [8192, 8192] x [8192, 8192] GEMM per target
(2026-11-29, libtpu 0.0.42.1): 2 n^3 / estimated cycles is 115k FLOP per
cycle on v5e (88% of its 4 x 128 x 128 x 2 MXU peak at 1.5 GHz), 236k on
v5p (two TensorCores: 90%), 369k on v6e (70% at 1.75 GHz) and 118k on v4,
45% of a megacore chip: v4's figures may count one TensorCore of two.

    python -m benchmarks.tpu_cost HLO.txt --target v5e
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import re

from benchmarks import roofline

# TensorCore clock (peak bf16 FLOP/s over the MXUs' FLOP per cycle) and HBM
# bytes/s of one chip.
CLOCK_HZ = {"v4": 1.05e9, "v5e": 1.5e9, "v5p": 1.75e9, "v6e": 1.75e9}
HBM_BPS = {"v4": 1.2e12, "v5e": 0.819e12, "v5p": 2.765e12, "v6e": 1.64e12}
# Markers and layout-only custom calls (no work of their own).
_FREE_CALLS = ("ConcatBitcast", "AllocateBuffer", "AssumeGatherIndicesInBound")
# An async pair's start is the DMA (`async_s`); its done only waits.
# Reshapes left in XLA:TPU's scheduled HLO are layout-preserving.
_ASYNC = {"copy-start", "slice-start"}
_FREE = (roofline._NO_KERNEL - _ASYNC) | {"slice-done", "reshape"}
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\](?:\{([^}]*)\})?")
_TILE = re.compile(r"T\(([0-9,]+)\)")


def tiled_bytes(type_str: str) -> int:
  """Bytes of an HLO type in its TPU layout: the minor dimensions padded to
  the first tile, e.g. bf16[5,8,32]{2,1,0:T(8,128)(2,1)} as [5,8,128]."""
  return sum(_array_bytes(type_str))


def _array_bytes(type_str: str) -> list:
  """tiled_bytes of each array in the type, in order (tuples flattened)."""
  out = []
  for dt, dims, layout in _ARRAY.findall(type_str):
    if dt not in roofline._BYTES:
      continue
    shape = [int(d) for d in dims.split(",") if d]
    order, _, tiling = (layout or "").partition(":")
    minor_to_major = [int(d) for d in order.split(",") if d]
    tile = _TILE.search(tiling)
    if tile and minor_to_major:
      sizes = [int(t) for t in tile.group(1).split(",")][::-1]
      for dim, t in zip(minor_to_major, sizes):
        shape[dim] = -(-shape[dim] // t) * t
    out.append(roofline._BYTES[dt] * math.prod(shape))
  return out


def estimate(text: str, target: str = "v5e", depth: int = 3) -> dict:
  """XLA:TPU's estimated time of one compiled module (see the module doc),
  in `roofline.estimate`'s form: total and per model part."""
  clock, hbm = CLOCK_HZ[target], HBM_BPS[target]
  comps, entry = roofline.parse(text)
  mult = roofline._multipliers(comps, entry)
  groups = collections.defaultdict(collections.Counter)
  tot = collections.Counter()
  for cname, k in mult.items():
    instrs = comps.get(cname, ())
    types = {i.name: i.type for i in instrs}
    for ins in instrs:
      target_name = ins.attr("custom_call_target") or ""
      if ins.opcode in _FREE or any(f in target_name for f in _FREE_CALLS):
        continue
      m = _CYCLES.search(ins.attrs)
      read = sum(tiled_bytes(types.get(o, "")) for o in ins.operands)
      if ins.opcode in _ASYNC:   # type ((sources), destination, context)
        nbytes = 2 * _array_bytes(ins.type)[len(ins.operands)]
      else:
        nbytes = tiled_bytes(ins.type) + read
      if m:
        t, kind = int(m.group(1)) / clock, "xla_s"
      else:
        t = nbytes / hbm
        kind = "async_s" if ins.opcode in _ASYNC else "unestimated_s"
      g = groups[roofline._group(ins, depth)]
      for c in (g, tot):
        c[kind] += k * t
        if kind != "async_s":
          c["kernels"] += k
          c["bytes"] += k * nbytes
          c["s"] += k * t
  return dict(target=target, clock_hz=clock, bandwidth=hbm,
              total={k: float(v) for k, v in tot.items()},
              groups={g: {k: float(v) for k, v in c.items()}
                      for g, c in sorted(groups.items(),
                                         key=lambda x: -x[1]["s"])})


def report(est, top=12) -> str:
  t = est["total"]
  lines = [f"XLA:TPU cost model ({est['target']}): {t['s'] * 1e3:.2f} ms per "
           f"step over {int(t['kernels'])} kernels, "
           f"{t.get('unestimated_s', 0) * 1e3:.2f} ms of it in kernels "
           f"without an estimate (tiled bytes / HBM bandwidth); async DMAs "
           f"beside them {t.get('async_s', 0) * 1e3:.2f} ms"]
  lines.append(f"{'part':<48} {'ms':>7} {'share':>6} {'unestimated ms':>14} "
               f"{'kernels':>7}")
  for g, c in list(est["groups"].items())[:top]:
    lines.append(f"{g[:48]:<48} {c['s'] * 1e3:7.2f} {c['s'] / t['s']:6.1%} "
                 f"{c.get('unestimated_s', 0) * 1e3:14.2f} "
                 f"{int(c['kernels']):7d}")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.tpu_cost",
                              description=__doc__.split("\n")[0])
  p.add_argument("hlo", help="optimized HLO text (compiled.as_text())")
  p.add_argument("--target", default="v5e", choices=sorted(CLOCK_HZ))
  p.add_argument("--depth", type=int, default=3,
                 help="module-path levels per row")
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  with open(a.hlo) as f:
    est = estimate(f.read(), a.target, a.depth)
  print(report(est, top=40))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(est, f, indent=1)


if __name__ == "__main__":
  main()
