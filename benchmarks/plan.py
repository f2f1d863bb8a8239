"""Compile the train and eval steps without running them, for this machine
or for a GPU or TPU that is not here: XLA's memory plan, FLOPs, compile time.

    python -m benchmarks.plan --target h100 --configs avss_pvt2_224 \
        --dtypes bfloat16 --remat false,true --scan true --batch 4 \
        --phases unfrozen [--roofline] [--json OUT]

`--target local` compiles for this process's devices. `--target h100|h200`
compiles for that GPU through JAX's compile-only topology (deviceless AOT,
`jax.experimental.topologies`) from the device description in
`benchmarks/targets/<target>.txtpb`: it needs the CUDA plugin of the
installed jaxlib (`pip install "jax[cuda12]==$(python -c 'import jax;
print(jax.__version__)')"`: the compiler and ptxas), no GPU. It is XLA:GPU's
own buffer assignment of the real step (`train.Steps`, shard_mapped,
state donated), so it answers "does batch B fit in N GB" before a device is
lent. Without a device XLA cannot autotune: GEMMs go to cuBLAS (Triton
GEMM fusion off, `GPU_FLAGS`) and convolution algorithms (and their
workspaces) may differ from a run's. Nothing is timed. `--roofline` adds
the step's time if every kernel ran at the GPU's peak FLOP/s or bandwidth
(benchmarks/roofline.py) and the model-FLOP utilisation that allows.

`--target v4|v5e|v5p|v6e` compiles for one host's chips of that TPU
(`v5e:2x2` etc.) through libtpu's compile-only topology (`pip install
"jax[tpu]==<jax version>"`, no TPU): XLA:TPU's own memory plan (tiled
layouts, i.e. padded to 8x128 tiles) and compile time. Not timed; there
`--roofline` sums the cycles XLA:TPU's cost model gave each kernel
(benchmarks/tpu_cost.py) instead.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from benchmarks import common
from benchmarks import model as bench_model
from benchmarks import roofline
from benchmarks import tpu_cost

GPU_TARGETS = ("h100", "h200")
# Compile-only TPU topologies (one host's chips; libtpu, no TPU needed).
TPU_TARGETS = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1",
               "v6e": "v6e:2x2"}
TARGETS = ("local",) + GPU_TARGETS + tuple(TPU_TARGETS)
GPU_FLAGS = "--xla_gpu_enable_triton_gemm=false"
# HBM bytes/s of the SXM parts, for --roofline (peak FLOP/s: PEAK_BF16).
BANDWIDTH = {"h100": 3.35e12, "h200": 4.8e12}
_TARGET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                           "targets")


def _topology(target: str, needs: str, extra: str, **kwargs):
  """JAX's compile-only topology, or an exit naming what to install."""
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(**kwargs)
  except Exception as e:          # noqa: BLE001  (plugin missing: many kinds)
    raise SystemExit(
        f"benchmarks.plan: cannot compile for {target} without {needs} "
        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Install it "
        f'for jax {jax.__version__}: pip install "jax[{extra}]=='
        f'{jax.__version__}" (no {target} needed)')


def target_mesh(target: str, devices: int):
  """A `data` mesh of the local devices or of compile-only GPU/TPU devices."""
  from avsegformer_jax import train
  if target == "local":
    return train.make_mesh()
  if target in TPU_TARGETS:
    topo = _topology(target, "libtpu", "tpu", platform="tpu",
                     topology_name=TPU_TARGETS[target])
    if devices > len(topo.devices):
      raise SystemExit(f"benchmarks.plan: {target} compiles for at most "
                       f"{len(topo.devices)} chips")
    return train.make_mesh(list(topo.devices)[:devices])
  with open(os.path.join(_TARGET_DIR, f"{target}.txtpb")) as f:
    target_config = f.read()
  topo = _topology(target, "JAX's CUDA plugin", "cuda12", platform="cuda",
                   target_config=target_config, topology=f"1x1x{devices}")
  return train.make_mesh(list(topo.devices))


def _abstract(tree, sharding):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree)


def plan_row(name, dtype, remat, scan, batch, eval_batch, phases, mesh,
             overrides=None, roofline_of=None) -> dict:
  """Compile every phase of one combination on abstract inputs;
  `roofline_of(hlo_text)` (benchmarks/roofline.py) bounds each step's time."""
  from avsegformer_jax import avsegformer, train
  config, row = bench_model.combination(name, dtype, remat, scan, batch,
                                        eval_batch, overrides)
  steps = train.Steps(avsegformer.build_model(config, axis_name=train.AXIS),
                      config, mesh)
  plain = avsegformer.build_model(config)
  state = jax.eval_shape(lambda r: train.create_train_state(config, plain, r),
                         jax.random.PRNGKey(0))
  replicated = NamedSharding(mesh, P())
  split = NamedSharding(mesh, P(train.AXIS))

  def batch_of(clips):
    return _abstract(bench_model.random_batch(config, clips), split)

  def compile_phase(phase, fn, *args):
    tm = {}
    compiled, secs, flops = common.aot_compile(fn, *args, times=tm)
    mflops = (bench_model.model_flops(config, mesh, *args, flops)
              if phase.startswith("train") else flops)
    plan = common.memory_plan(compiled)
    row.update({f"{phase}_compile_s": secs, f"{phase}_flops": flops,
                f"{phase}_model_flops": mflops,
                f"{phase}_xla_compile_s": tm["xla_s"]})
    if roofline_of:
      est = roofline_of(compiled.as_text())
      t = est["total"]
      row.update({f"{phase}_roofline_ms": t["s"] * 1e3,
                  f"{phase}_roofline_gb": t["bytes"] / 1e9,
                  f"{phase}_roofline_kernels": int(t["kernels"]),
                  f"{phase}_roofline_mfu": mflops / t["s"] / est["peak_flops"],
                  f"{phase}_roofline_parts": {
                      g: round(c["s"] * 1e3, 3)
                      for g, c in est["groups"].items()}})
    row.update({f"{phase}_plan_{k}_bytes": v for k, v in plan.items()})

  if "eval" in phases:
    # As evaluation.evaluate and predict: the weights cast once, not per step.
    variables = _abstract(jax.eval_shape(
        lambda v: avsegformer.cast_weights(v, config.model.dtype),
        {"params": state.params, "batch_stats": state.batch_stats}),
        replicated)
    compile_phase("eval", steps._eval, variables, batch_of(eval_batch))
  for phase in ("frozen", "unfrozen"):
    if phase in phases:
      if phase == "unfrozen":
        state = jax.eval_shape(lambda s: train.unfreeze_backbone(s, config),
                               state)
      compile_phase(f"train_{phase}", steps._train,
                    _abstract(state, replicated), batch_of(batch))
  return row


COLS = [("config", "config", None), ("dtype", "dtype", None),
        ("remat", "remat", None), ("scan", "scan", None),
        ("clips", "_clips", None), ("phase", "phase", None),
        ("compile s", "compile_s", "{:.1f}"),
        ("XLA s", "xla_compile_s", "{:.1f}"), ("GFLOP", "_gflop", "{:.0f}"),
        ("args GiB", "_args", "{:.2f}"), ("temp GiB", "_temp", "{:.2f}"),
        ("plan GiB", "_total", "{:.2f}"),
        ("roofline ms", "roofline_ms", "{:.1f}"),
        ("MFU <=", "roofline_mfu", "{:.1%}")]


def table(rows) -> str:
  """One line per compiled phase."""
  lines = []
  for r in rows:
    for phase in ("eval", "train_frozen", "train_unfrozen"):
      if f"{phase}_compile_s" not in r:
        continue
      g = lambda k: r.get(f"{phase}_{k}")                   # noqa: E731
      gib = lambda k: None if g(k) is None else g(k) / 2**30  # noqa: E731
      lines.append(dict(
          r, phase=phase, compile_s=g("compile_s"),
          xla_compile_s=g("xla_compile_s"),
          _clips=r["eval_batch_clips" if phase == "eval" else "batch_clips"],
          _gflop=g("flops") / 1e9, _args=gib("plan_argument_bytes"),
          _temp=gib("plan_temp_bytes"), _total=gib("plan_total_bytes"),
          roofline_ms=g("roofline_ms"), roofline_mfu=g("roofline_mfu")))
  return common.fmt_table(lines, COLS)


def parse_args(argv):
  p = argparse.ArgumentParser(prog="python -m benchmarks.plan",
                              description=__doc__.split("\n")[0])
  p.add_argument("--target", default="local", choices=TARGETS)
  p.add_argument("--devices", type=int, default=1,
                 help="GPUs or TPU chips of the target (the data axis); "
                      "local: all")
  p.add_argument("--configs", default="avss_pvt2_224",
                 help=f"comma list of {sorted(bench_model.SPECS)}")
  p.add_argument("--dtypes", default="bfloat16")
  p.add_argument("--remat", type=common.remat_list, default=[False])
  p.add_argument("--scan", type=common.bool_list, default=[True])
  p.add_argument("--batch", type=int, default=1, help="train clips (global)")
  p.add_argument("--eval_batch", type=int, default=1, help="eval clips")
  p.add_argument("--phases", default="unfrozen")
  bench_model.add_override_flags(p)
  p.add_argument("--roofline", action="store_true",
                 help="bound each step by the device's peak FLOP/s and "
                      "memory bandwidth, kernel by kernel (GPU targets); "
                      "on TPU targets, XLA:TPU's cost model (tpu_cost.py)")
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  if a.roofline and a.target == "local":
    p.error("--roofline needs a GPU or TPU target")
  bench_model.split_lists(p, a)
  return a


def main(argv=None):
  a = parse_args(sys.argv[1:] if argv is None else argv)
  if a.target == "local":
    from avsegformer_jax import xla_cpu
    xla_cpu.configure()                          # as the CLIs do
  else:   # compile-only GPU devices; the local backend stays the CPU
    jax.config.update("jax_platforms", "cpu")
    # Triton GEMM tiles are chosen by autotuning, which needs the device
    # ("Couldn't find output tile sizes" without it): cuBLAS GEMMs instead.
    if a.target in GPU_TARGETS:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " "
                                 + GPU_FLAGS).strip()
  mesh = target_mesh(a.target, a.devices)
  n = mesh.devices.size
  for b in (a.batch, a.eval_batch):
    if b % n:
      raise SystemExit(f"benchmarks.plan: batch {b} does not split over "
                       f"{n} devices")
  info = dict(common.device_info(), target=a.target,
              target_devices=[d.device_kind for d in mesh.devices.flat][:1],
              num_target_devices=int(n))
  roofline_of = None
  if a.roofline and a.target in TPU_TARGETS:
    peak = bench_model._peak_flops(mesh.devices.flat[0].device_kind)
    roofline_of = lambda text: dict(                  # noqa: E731
        tpu_cost.estimate(text, a.target), peak_flops=peak)
  elif a.roofline:
    roofline_of = functools.partial(
        roofline.estimate, bandwidth=BANDWIDTH[a.target],
        peak_flops=bench_model._peak_flops(a.target))
  rows = []
  for name, dtype, remat, scan in itertools.product(
      a.configs, a.dtypes, a.remat, a.scan):
    try:
      row = plan_row(name, dtype, remat, scan, a.batch, a.eval_batch,
                     a.phases, mesh, bench_model.given_overrides(a),
                     roofline_of)
    except Exception as e:       # noqa: BLE001  (report, go on: a table row)
      row = dict(config=name, dtype=dtype, remat=remat, scan=scan,
                 batch_clips=a.batch, error=f"{type(e).__name__}: {e}"[:300])
    rows.append(row)
    print("row: " + (table([row]).splitlines()[-1] if "error" not in row
                     else row["error"]), file=sys.stderr, flush=True)
    common.write_json(a.json, {"device": info, "args": vars(a), "rows": rows})
  kind = info["target_devices"][0] if info["target_devices"] else "?"
  print(f"target: {a.target} ({n} x {kind}); per-device plans, "
        f"jax {jax.__version__}, compiled on {info['device_kind']}")
  print(table([r for r in rows if "error" not in r]))
  for r in rows:
    if "error" in r:
      print(f"{r['config']} {r['dtype']} remat={r['remat']}: {r['error']}")
  return rows


if __name__ == "__main__":
  main()
