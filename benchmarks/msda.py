"""Multi-scale deformable attention: time the core implementations.

    python -m benchmarks.msda [--sizes 224,512] [--frames 5] [--steps 5]
        [--dtypes float32] [--impls gather4,fused,rows,taps] [--json OUT]

("pallas", the Triton kernels, is in the default list on GPUs only.)

Shapes are the encoder's: every pixel of the stride 8/16/32 levels queries
(Lq = S = 1029 at 224, 5376 at 512), 8 heads of 32 channels, 3 levels,
4 points, N = frames (B*T). Times the forward and forward+backward (gradient
with respect to value, locations and weights, as in training) of
`ms_deform_attn_core`, and checks the implementations agree.
"""
from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from avsegformer_jax import deformable_attention as da
from avsegformer_jax import xla_cpu
from benchmarks import common

HEADS, HEAD_DIM, POINTS = 8, 32, 4


def encoder_shapes(size: int):
  return tuple((size // s, size // s) for s in (8, 16, 32))


def inputs(size: int, n: int, dtype, seed: int = 0):
  shapes = encoder_shapes(size)
  s = sum(h * w for h, w in shapes)
  nl = len(shapes)
  r = np.random.RandomState(seed)
  value = r.standard_normal((n, s, HEADS, HEAD_DIM)).astype(np.float32)
  # Reference points at pixel centres plus offsets of a few pixels, as the
  # trained model's; some fall outside the map (the zero-padding path).
  loc = r.uniform(-0.05, 1.05, (n, s, HEADS, nl, POINTS, 2)).astype(np.float32)
  logits = r.standard_normal((n, s, HEADS, nl * POINTS)).astype(np.float32)
  aw = jax.nn.softmax(logits, -1).reshape(n, s, HEADS, nl, POINTS)
  return shapes, jnp.asarray(value, dtype), jnp.asarray(loc), jnp.asarray(aw)


def bench_one(impl, shapes, value, loc, aw, steps):
  fwd = jax.jit(lambda v, l, a: da.ms_deform_attn_core(v, shapes, l, a, impl))
  ct = jnp.asarray(np.random.RandomState(1).standard_normal(
      (value.shape[0], loc.shape[1], HEADS * HEAD_DIM)), value.dtype)

  def loss(v, l, a):
    out = da.ms_deform_attn_core(v, shapes, l, a, impl)
    return jnp.sum(out.astype(jnp.float32) * ct.astype(jnp.float32))
  bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  row = {"impl": impl}
  for name, fn in (("fwd", fwd), ("fwd_bwd", bwd)):
    compiled, secs, _ = common.aot_compile(fn, value, loc, aw)
    common.timed(lambda: compiled(value, loc, aw), 1)          # warm-up
    times, out = common.timed(lambda: compiled(value, loc, aw), steps)
    row[f"{name}_compile_s"] = secs
    row[f"{name}_ms"] = 1e3 * common.summary(times)["median_s"]
    row[f"_{name}_out"] = out
  return row


def run(sizes, frames, steps, dtypes, impls):
  rows = []
  for size in sizes:
    for dt in dtypes:
      shapes, value, loc, aw = inputs(size, frames, jnp.dtype(dt))
      group = []
      for impl in impls:
        row = bench_one(impl, shapes, value, loc, aw, steps)
        row.update(size=size, dtype=dt, frames=frames,
                   queries=int(loc.shape[1]))
        group.append(row)
      refs = {k: jax.tree.leaves(group[0][f"_{k}_out"])
              for k in ("fwd", "fwd_bwd")}
      for row in group:         # agreement with the first implementation
        for k, ref in refs.items():
          row[f"{k}_maxdiff"] = max(
              float(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32)).max())
              for x, y in zip(jax.tree.leaves(row.pop(f"_{k}_out")), ref))
      best = min(group, key=lambda r: r["fwd_bwd_ms"])
      for row in group:
        row["fastest_fwd_bwd"] = row is best
      rows.extend(group)
  return rows


COLS = [("size", "size", None), ("dtype", "dtype", None), ("impl", "impl", None),
        ("fwd ms", "fwd_ms", "{:.1f}"), ("fwd+bwd ms", "fwd_bwd_ms", "{:.1f}"),
        ("compile fwd s", "fwd_compile_s", "{:.2f}"),
        ("compile f+b s", "fwd_bwd_compile_s", "{:.2f}"),
        ("max|diff| f+b", "fwd_bwd_maxdiff", "{:.1e}"),
        ("fastest", "fastest_fwd_bwd", None)]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--sizes", default="224,512")
  p.add_argument("--frames", type=int, default=5, help="N = B*T")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dtypes", default="float32")
  p.add_argument("--impls", default="",
                 help="comma list of cores (default: all but auto; pallas "
                      "on GPUs only)")
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  xla_cpu.configure()        # as the CLIs do (avsegformer_jax/xla_cpu.py)
  gpu = jax.default_backend() == "gpu"
  impls = a.impls.split(",") if a.impls else [
      i for i in da.IMPLS if i != "auto" and (gpu or i != "pallas")]
  if "pallas" in impls and not gpu:
    p.error("--impls pallas: Triton kernels need a GPU, this backend is "
            f"{jax.default_backend()!r}")
  rows = run([int(s) for s in a.sizes.split(",")], a.frames, a.steps,
             a.dtypes.split(","), impls)
  info = common.device_info()
  print(f"MSDA core, {info['device_kind']} ({info['platform']}), "
        f"N={a.frames}, {HEADS} heads x {HEAD_DIM}, {POINTS} points, 3 levels")
  print(common.fmt_table(rows, COLS))
  common.write_json(a.json, {"device": info, "args": vars(a), "rows": rows})
  return rows


if __name__ == "__main__":
  main(sys.argv[1:])
