"""Whole-model speed: train step, eval step, compile time, peak memory.

    python -m benchmarks.model [--configs s4_res50_224,s4_pvt2_224,...]
        [--dtypes float32,bfloat16] [--steps N] [--json OUT] [--quick]
        [--remat false[,true,dots]] [--scan false[,true]] [--batch B]
        [--eval_batch B] [--phases eval,frozen,unfrozen] [--pipeline]

Uses the real training code (`train.Steps`: shard_mapped, jitted, donated
state) on random data: B clips of T frames (T=5, AVSS T=10). For every
config x dtype x remat x scan it reports the train step with the visual
backbone frozen and unfrozen (seconds, clips/s, compile seconds), the eval
step (frames/s, compile seconds), the peak memory (the device allocator's
peak on accelerators, the process's peak RSS on CPU), XLA's memory plan of
each step (`common.memory_plan`) and the steps' matmul FLOPs. Each
combination runs in its own subprocess so the peak memory is its own
(`--inprocess` turns that off; `--quick` implies it). `--pipeline` adds the
input pipeline's clips/s and eval frames/s for each config beside the
steps' (synthetic data, this host's CPUs). Runs unchanged on CPU
and GPU/TPU; `benchmarks.plan` compiles without running, also for a GPU
that is not here.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from avsegformer_jax import xla_cpu
from benchmarks import common

# name: (config module, backbone, image size)
SPECS = {
    "s4_res50_224": ("s4", "res50", 224),
    "s4_pvt2_224": ("s4", "pvt2", 224),
    "s4_pvt2_512": ("s4", "pvt2", 512),
    "avss_pvt2_224": ("avss", "pvt2", 224),
    "tiny_pvt2": ("tiny", "pvt2", 64),
    "tiny_res50": ("tiny", "res50", 64),
}
DEFAULT_CONFIGS = "s4_res50_224,s4_pvt2_224,s4_pvt2_512,avss_pvt2_224"
PHASES = ("eval", "frozen", "unfrozen")
# Dense bf16 peak FLOP/s by device kind, for the model-FLOP utilisation column.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12,
             "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
             "TPU v5p": 459e12, "TPU v6": 918e12}


# Config fields a run may override from the command line (--msda_impl ...):
# the config section that holds each, and its type.
OVERRIDES = {"msda_impl": ("model", str), "attention_impl": ("model", str),
             "attention_dropout": ("model", float), "dropout_impl": ("model", str),
             "prng_impl": ("train", str)}


def add_override_flags(p):
  for key, (section, kind) in OVERRIDES.items():
    p.add_argument(f"--{key}", type=kind, default=None,
                   help=f"override {section}.{key}")


def given_overrides(a) -> dict:
  """{field: value} of the override flags given."""
  return {k: getattr(a, k) for k in OVERRIDES
          if getattr(a, k, None) is not None}


def make_config(name, dtype="float32", remat=False, scan=False,
                overrides=None):
  import importlib
  module, backbone, size = SPECS[name]
  config = importlib.import_module(f"configs.{module}").get_config(backbone)
  config.data.image_size = size
  config.model.dtype = dtype
  config.model.remat = bool(remat)           # True, or a policy name
  if isinstance(remat, str):
    config.model.remat_policy = remat
  config.model.scan_layers = scan
  for key, value in (overrides or {}).items():   # typed by their flags
    config[OVERRIDES[key][0]][key] = value
  return config


def random_batch(config, clips: int, seed: int = 0):
  """A host batch as the input pipeline gives it (uint8 frames and masks,
  task-shaped labels and flags)."""
  t, s = config.data.num_frames, config.data.image_size
  r = np.random.RandomState(seed)
  if config.task == "avss":
    masks = r.randint(0, config.model.num_classes, (clips, t, s, s))
    gt_flag = np.ones((clips, t), np.float32)
  else:
    masks = (r.rand(clips, t, s, s) > 0.5)
    gt_flag = np.zeros((clips, t), np.float32)
    gt_flag[:, 0] = 1.0                                  # S4 train: frame 0
  return dict(
      frames=r.randint(0, 256, (clips, t, s, s, 3)).astype(np.uint8),
      audio=r.standard_normal((clips, t, 96, 64)).astype(np.float32),
      masks=masks.astype(np.uint8), gt_flag=gt_flag,
      vid_flag=np.ones((clips, t), np.float32),
      clip_valid=np.ones((clips,), np.float32))


def _peak_flops(kind: str):
  for k, v in PEAK_BF16.items():
    if k.lower() in kind.lower():
      return v
  return None


def combination(name, dtype, remat, scan, batch, eval_batch,
                overrides=None):
  """(config, the row's fields naming it) of one benchmarked combination;
  the backbone starts frozen so both train phases can be compiled."""
  config = make_config(name, dtype, remat, scan, overrides)
  config.train.freeze_backbone_epochs = 1
  row = dict(config=name, dtype=dtype, remat=remat, scan=scan,
             batch_clips=batch, eval_batch_clips=eval_batch,
             frames_per_clip=config.data.num_frames,
             image_size=config.data.image_size,
             **{k: config[sec].get(k) for k, (sec, _) in OVERRIDES.items()})
  return config, row


def model_flops(config, mesh, state, batch, flops):
  """The train step's matmul FLOPs without rematerialisation (traced, not
  compiled): MFU's numerator. A rematerialised step's own count (`flops`)
  also has the recomputed forwards, hardware FLOPs."""
  if not config.model.remat:
    return flops
  from avsegformer_jax import avsegformer, train
  plain = config.copy_and_resolve_references()
  plain.model.remat = False
  steps = train.Steps(avsegformer.build_model(plain, axis_name=train.AXIS),
                      plain, mesh)
  return common.matmul_flops(steps._train.trace(state, batch).jaxpr)


def setup(name, dtype, remat, scan, batch, eval_batch, overrides=None):
  """(config, row, mesh, train.Steps, replicated train state) of one
  combination, ready to compile its steps; row["init_s"] is the init's."""
  from avsegformer_jax import avsegformer, train
  config, row = combination(name, dtype, remat, scan, batch, eval_batch,
                            overrides)
  mesh = train.make_mesh()
  model = avsegformer.build_model(config, axis_name=train.AXIS)
  steps_fn = train.Steps(model, config, mesh)
  t0 = time.perf_counter()
  plain = avsegformer.build_model(config)
  with common.compiling():                       # the init is jitted
    variables = avsegformer.init_variables(plain, jax.random.PRNGKey(1))
    state = train.create_train_state(config, plain, jax.random.PRNGKey(0),
                                     variables=variables)
    state = jax.block_until_ready(train.replicate(state, mesh))
  row["init_s"] = time.perf_counter() - t0
  return config, row, mesh, steps_fn, state


def eval_inputs(config, state, clips, mesh):
  """(variables, sharded batch) of the eval step: as evaluation.evaluate and
  predict, the weights cast to the compute dtype once, not per step."""
  from avsegformer_jax import avsegformer, train
  gb = train.shard_batch(random_batch(config, clips), mesh)
  variables = avsegformer.cast_weights(
      {"params": state.params, "batch_stats": state.batch_stats},
      config.model.dtype)
  return variables, gb


def bench(name, dtype, remat, scan, steps, warmup, batch, eval_batch,
          phases, overrides=None) -> dict:
  """All phases of one combination, in this process."""
  from avsegformer_jax import train
  config, row, mesh, steps_fn, state = setup(
      name, dtype, remat, scan, batch, eval_batch, overrides)
  row["steps"] = steps
  t_frames = config.data.num_frames
  peak = _peak_flops(jax.devices()[0].device_kind)
  n_dev = jax.device_count()

  def loop(compiled, fn):
    with common.device_to_itself():
      common.timed(fn, warmup)
      out = common.timed(fn, steps)
      row.setdefault("load_avg_timing", []).append(os.getloadavg()[0])
    return out

  def plan(phase, compiled):
    p = common.memory_plan(compiled)
    if p:
      row[f"{phase}_plan_bytes"] = p["total"]
      row[f"{phase}_plan_temp_bytes"] = p["temp"]

  if "eval" in phases:
    variables, gb = eval_inputs(config, state, eval_batch, mesh)
    tm = {}
    with common.compiling():
      compiled, secs, flops = common.aot_compile(steps_fn._eval, variables,
                                                 gb, times=tm)
    row.update(eval_compile_s=secs, eval_flops=flops,
               eval_xla_compile_s=tm["xla_s"])
    plan("eval", compiled)
    times, out = loop(compiled, lambda: compiled(variables, gb))
    med = common.summary(times)["median_s"]
    row.update(eval_step_s=med,
               eval_frames_per_s=eval_batch * t_frames / med)
    if not all(np.isfinite(np.asarray(x, np.float32)).all()
               for x in jax.tree_util.tree_leaves(out)):
      row["error"] = "non-finite eval outputs"
    row["peak_bytes_after_eval"], row["memory_kind"] = \
        common.peak_memory_bytes()

  gb = train.shard_batch(random_batch(config, batch), mesh)
  for phase in ("frozen", "unfrozen"):
    if phase not in phases:
      continue
    if phase == "unfrozen":
      state = train.unfreeze_backbone(state, config)
    tm = {}
    with common.compiling():
      compiled, secs, flops = common.aot_compile(steps_fn._train, state, gb,
                                                 times=tm)
    mflops = model_flops(config, mesh, state, gb, flops)
    row.update({f"train_{phase}_compile_s": secs,
                f"train_{phase}_xla_compile_s": tm["xla_s"],
                f"train_{phase}_flops": flops,
                f"train_{phase}_model_flops": mflops})
    plan(f"train_{phase}", compiled)
    holder = {"state": state}

    def step():
      holder["state"], stats = compiled(holder["state"], gb)   # donates state
      return stats
    times, stats = loop(compiled, step)
    state = holder["state"]
    med = common.summary(times)["median_s"]
    loss = float(stats["loss"])
    row.update({f"train_{phase}_step_s": med,
                f"train_{phase}_clips_per_s": batch / med,
                f"train_{phase}_loss": loss})
    if flops:
      row[f"train_{phase}_tflops_per_s"] = flops * n_dev / med / 1e12
      if peak:
        row[f"train_{phase}_mfu"] = mflops / med / peak
    row[f"peak_bytes_after_{phase}"], row["memory_kind"] = \
        common.peak_memory_bytes()
    if not np.isfinite(loss):
      row["error"] = f"non-finite loss in the {phase} train step"
  row["peak_bytes"] = max(v for k, v in row.items()
                          if k.startswith("peak_bytes_after_"))
  plans = [v for k, v in row.items() if k.endswith("_plan_bytes")]
  if plans:
    row["plan_bytes"] = max(plans)
  return row


def split_lists(p, a):
  """--configs, --dtypes, --phases: comma lists -> checked lists."""
  a.configs = a.configs.split(",")
  bad = [c for c in a.configs if c not in SPECS]
  if bad:
    p.error(f"unknown config(s) {bad}; choose from {sorted(SPECS)}")
  a.dtypes = a.dtypes.split(",")
  a.phases = tuple(x for x in a.phases.split(",") if x)
  if set(a.phases) - set(PHASES):
    p.error(f"--phases takes {PHASES}")


def parse_args(argv):
  p = argparse.ArgumentParser(
      prog="python -m benchmarks.model", description=__doc__.split("\n")[0])
  p.add_argument("--configs", default=None,
                 help=f"comma list of {sorted(SPECS)}")
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--remat", type=common.remat_list, default=[False],
                 help="false,true (full),dots")
  p.add_argument("--scan", type=common.bool_list, default=[False])
  p.add_argument("--steps", type=int, default=3, help="timed steps")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed runs after compiling")
  p.add_argument("--batch", type=int, default=1, help="train clips")
  p.add_argument("--eval_batch", type=int, default=1, help="eval clips")
  p.add_argument("--phases", default=",".join(PHASES))
  add_override_flags(p)
  p.add_argument("--json", default="")
  p.add_argument("--quick", action="store_true",
                 help="tiny configs, in-process (for tests and smoke runs)")
  p.add_argument("--inprocess", action="store_true")
  p.add_argument("--pipeline", action="store_true",
                 help="also time the input pipeline for each config "
                      "(benchmarks.input_pipeline.beside_steps)")
  p.add_argument("--jobs", type=int, default=1,
                 help="combinations at once (subprocesses): compiles overlap;"
                      " each times its steps alone on the device")
  a = p.parse_args(argv)
  if a.configs is None:
    a.configs = "tiny_pvt2" if a.quick else DEFAULT_CONFIGS
  split_lists(p, a)
  if a.quick:
    a.inprocess = True
  return a


def _jobs_env(jobs):
  """Each combination's process compiles afresh (no persistent cache); with
  --jobs they share one device: each allocates what it uses (no 75%
  preallocation) and times under one lock file."""
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = ""    # compile times are compiles
  if jobs > 1:
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if "BENCH_DEVICE_LOCK" not in env:
      fd, env["BENCH_DEVICE_LOCK"] = tempfile.mkstemp(prefix="bench_lock_")
      os.close(fd)
  return env


def subprocess_cmd(a, name, dtype, remat, scan, out):
  """One combination as a command line (strings: the override flags carry
  typed values, e.g. the float --attention_dropout)."""
  cmd = [sys.executable, "-m", "benchmarks.model", "--inprocess",
         "--configs", name, "--dtypes", dtype, "--remat", str(remat),
         "--scan", str(scan), "--steps", str(a.steps),
         "--warmup", str(a.warmup), "--batch", str(a.batch),
         "--eval_batch", str(a.eval_batch), "--phases", ",".join(a.phases),
         "--json", out]
  for key, value in given_overrides(a).items():
    cmd += [f"--{key}", str(value)]
  return cmd


def _subprocess_row(a, name, dtype, remat, scan, env=None):
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "row.json")
    cmd = subprocess_cmd(a, name, dtype, remat, scan, out)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == 0 and os.path.exists(out):
      with open(out) as f:
        return json.load(f)["rows"][0]
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(config=name, dtype=dtype, remat=remat, scan=scan,
                error=f"exit {proc.returncode}: " + " | ".join(tail))


COLS = [("config", "config", None), ("dtype", "dtype", None),
        ("remat", "remat", None), ("scan", "scan", None),
        ("frozen s", "train_frozen_step_s", "{:.3f}"),
        ("clips/s", "train_frozen_clips_per_s", "{:.2f}"),
        ("unfrozen s", "train_unfrozen_step_s", "{:.3f}"),
        ("clips/s", "train_unfrozen_clips_per_s", "{:.2f}"),
        ("pipe clips/s", "pipeline_train_clips_per_s", "{:.1f}"),
        ("eval fr/s", "eval_frames_per_s", "{:.1f}"),
        ("pipe fr/s", "pipeline_eval_frames_per_s", "{:.1f}"),
        ("compile frz/unf/eval s", "_compile", None),
        ("peak GiB", "_peak_gib", "{:.2f}"),
        ("plan GiB", "_plan_gib", "{:.2f}"),
        ("MFU unf", "train_unfrozen_mfu", "{:.1%}"),
        ("error", "error", None)]


def table(rows) -> str:
  shown = []
  for r in rows:
    r = dict(r)
    c = [r.get(f"{k}_compile_s") for k in
         ("train_frozen", "train_unfrozen", "eval")]
    r["_compile"] = "/".join("-" if v is None else f"{v:.1f}" for v in c)
    if r.get("peak_bytes"):
      r["_peak_gib"] = r["peak_bytes"] / 2**30
    if r.get("plan_bytes"):
      r["_plan_gib"] = r["plan_bytes"] / 2**30
    shown.append(r)
  piped = any("pipeline_workers" in r for r in rows)
  return common.fmt_table(shown, [c for c in COLS
                                  if piped or not c[1].startswith("pipeline")])


def main(argv=None):
  a = parse_args(sys.argv[1:] if argv is None else argv)
  xla_cpu.configure()        # as the CLIs do (avsegformer_jax/xla_cpu.py)
  info = common.device_info()
  rows = []
  args = {k: v for k, v in vars(a).items()}
  combos = list(itertools.product(a.configs, a.dtypes, a.remat, a.scan))

  def done(row):
    rows.append(row)
    # Partial results survive a time limit: one line now, JSON so far.
    print("row: " + table([row]).splitlines()[-1], file=sys.stderr,
          flush=True)
    common.write_json(a.json, {"device": info, "args": args, "rows": rows})

  if a.inprocess:
    for c in combos:
      done(bench(*c, a.steps, a.warmup, a.batch, a.eval_batch, a.phases,
                 given_overrides(a)))
  else:
    env = _jobs_env(a.jobs)
    try:
      with concurrent.futures.ThreadPoolExecutor(max(1, a.jobs)) as pool:
        futures = [pool.submit(_subprocess_row, a, *c, env) for c in combos]
        for f in concurrent.futures.as_completed(futures):
          done(f.result())
    finally:
      lock = env.get("BENCH_DEVICE_LOCK")
      if lock and lock != os.environ.get("BENCH_DEVICE_LOCK"):   # ours
        shutil.rmtree(lock + ".d", ignore_errors=True)
        os.remove(lock)
    order = {c: i for i, c in enumerate(combos)}
    rows.sort(key=lambda r: order.get(
        (r["config"], r["dtype"], r["remat"], r["scan"]), len(order)))
    common.write_json(a.json, {"device": info, "args": args, "rows": rows})
  if a.pipeline:              # after the steps: it loads this host's CPUs
    from benchmarks import input_pipeline  # pylint: disable=g-import-not-at-top
    input_pipeline.beside_steps(rows, a.configs)
    common.write_json(a.json, {"device": info, "args": args, "rows": rows})
  print(f"{info['device_kind']} ({info['platform']}, "
        f"{info['num_devices']} device(s), jax {info['jax']}); memory: "
        f"{rows[0].get('memory_kind', '?')}")
  print(table(rows))
  return rows


if __name__ == "__main__":
  main()
