"""Where a step's time goes: XLA's own trace of a few steps, each kernel
charged to the model component that emitted it.

    python -m benchmarks.profile [--config s4_pvt2_224] [--dtype bfloat16]
        [--remat true] [--scan true] [--phase unfrozen|frozen|eval]
        [--batch 16] [--steps 3] [--depth 3] [--top 25] [--json OUT]
        [--trace_dir DIR] [--msda_impl ...] [--attention_impl ...] ...

The step is the benchmarked one (`benchmarks.model`: the real shard_mapped
train or eval step on random data). It is traced with `jax.profiler`
(a Perfetto trace: no TensorBoard plugin needed) and every kernel event is
matched to its HLO instruction in the compiled step (the event's `hlo_op`)
and that instruction's `op_name` metadata: the flax module path, whether
JAX's transpose emitted it (`bwd`), a rematerialised forward (`remat`) or
the forward (`fwd`), and outside the model (`step`: loss, optimizer);
unrolled layers count as their scanned layer (`block3_12` as `block3`). It
prints, per step: the wall time, the device's busy time (the union of its
kernels' intervals) and so the share it sat idle between kernels (launches,
while-loop trips, host work), then kernel time by component, by kind (GEMM,
convolution, fused attention, Triton, gather/scatter, collectives, fusions
by XLA kind, copies) and the top kernels. On GPUs and TPUs only the device's
streams count; on CPU, XLA's thunks on the host threads (the command turns
on XLA:CPU's thunk tracing), whose busy time is the union over threads. The tracer's own cost makes the idle
share an upper bound.
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax

from avsegformer_jax import xla_cpu
from benchmarks import common
from benchmarks import model as bench_model
from benchmarks import roofline

# Tokens of an op_name that say how, not where (scan, remat, cond, jit).
_PLUMBING = roofline.NAME_PLUMBING | {"cond", "train_step", "shard_map"}
_RNG = re.compile(r"jit\(_(threefry|bernoulli|uniform|random|rbg)")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter",
                "collective-permute", "all-to-all")
# `%name = shape opcode(...)`, then the attributes that classify it.
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\s([a-z][\w\-]*)\(")


def hlo_instructions(hlo_text: str) -> dict:
  """{instruction name: (opcode, op_name or "", kind)} of a compiled
  module's text (every computation: while bodies' kernels too). An
  instruction XLA made without metadata borrows its fused computation's
  first op_name, else names the weight it reads ('(no metadata) vggish/
  embeddings_0' for a weight-gradient dot), else takes its first labelled
  operand's."""
  out, first_op, calls, lines, inner = {}, {}, {}, {}, {}
  computation = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
    if head:
      computation = head.group(1)
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    op = re.search(r'op_name="([^"]*)"', line)
    if op and computation:
      first_op.setdefault(computation, op.group(1))
    if computation and opcode in ("dot", "convolution"):
      inner.setdefault(computation, opcode)
    c = re.search(r"calls=%?([\w.\-]+)", line)
    if c:
      calls[name] = c.group(1)
    lines[name] = line
    out[name] = (opcode, op.group(1) if op else "", _kind(opcode, line))
  for name, (opcode, op_name, kind) in list(out.items()):
    if kind == "custom fusion" and calls.get(name) in inner:  # e.g. XLA:CPU's
      kind = _kind(inner[calls[name]], "")             # dot fusions (YNNPACK)
      out[name] = (opcode, op_name, kind)
    if not op_name:
      weight = re.search(r"params__(\w+?)____(\w+?)____", lines[name])
      operands = re.findall(r"%([\w.\-]+)", lines[name].split("=", 1)[1])
      op_name = first_op.get(calls.get(name), "") or (
          weight and f"(no metadata) {weight.group(1)}/{weight.group(2)}"
          or next((out[o][1] for o in operands
                   if o in out and out[o][1]), ""))
      out[name] = (opcode, op_name, kind)
  return out


def _kind(opcode: str, line: str) -> str:
  low = line.lower()
  target = re.search(r'custom_call_target="([^"]*)"', line)
  target = target.group(1).lower() if target else ""
  if opcode == "dot" or "gemm" in target or "matmul" in target or \
      "__triton_gemm" in low or '"kind":"__cublas' in low:
    return "gemm"
  if opcode == "convolution" or "conv" in target:
    return "convolution"
  if "fmha" in target or "flash" in target or "dot_product_attention" in low:
    return "fused attention"
  if "triton" in target:
    return "triton (pallas)"
  if opcode.startswith(_COLLECTIVES):
    return "collective"
  if opcode in ("gather", "scatter"):
    return "gather/scatter"
  if opcode in ("copy", "transpose", "copy-start", "copy-done"):
    return "copy/transpose"
  if opcode == "fusion":
    k = re.search(r"kind=k(\w+)", line)
    return {"Loop": "elementwise fusion", "Input": "reduction fusion",
            "Output": "output fusion", "Custom": "custom fusion"}.get(
                k.group(1) if k else "", "fusion")
  if opcode == "custom-call":
    return f"custom-call {target}" if target else "custom-call"
  return opcode


def component(op_name: str, depth: int, model: str = "AVSegFormer") -> str:
  """'fwd|bwd|remat|step <module path to depth>' of an op_name, e.g.
  'bwd backbone/block3/mlp' for a kernel of the transposed (backward) PVTv2
  stage-3 MLP. Dropout's random bits are named 'rng' under their module."""
  if not op_name or op_name.startswith("(no metadata)"):
    return op_name or "(no metadata)"
  tokens = op_name.split("/")
  at = [i for i, t in enumerate(tokens) if model in t]
  if not at:
    return "step " + (_RNG.search(op_name) and "rng" or "(outside the model)")
  how = ("remat" if "rematted_computation" in tokens else    # in the bwd
         "bwd" if "transpose(" in tokens[at[0]] else "fwd")
  path = []
  # After the model's last mention: an unrolled rematerialised layer's
  # names repeat the path to it. The last token is the primitive.
  for t in tokens[at[-1] + 1:-1]:
    if _RNG.match(t):
      path.append("rng")
      break
    if t in _PLUMBING or re.fullmatch(r"[\w\-]+\(.*\)|branch_\d+_fun", t):
      continue                    # jvp(Net), jit(f), transpose(...), cond
    path.append(roofline.LAYER_INDEX.sub("", t))   # as scanned layers
  return f"{how} {'/'.join(path[:depth]) or '(model top level)'}"


def _union(intervals) -> float:
  busy, end = 0.0, float("-inf")
  for start, stop in sorted(intervals):
    if stop > end:
      busy += stop - max(start, end)
      end = stop
  return busy


def kernel_events(trace: dict) -> tuple[list, str]:
  """(complete events of kernels, where they ran): a device's streams when
  the trace has a device (GPU: 'Stream' threads; TPU: 'XLA Ops'), else the
  host threads' XLA thunks (CPU)."""
  events = trace["traceEvents"]
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  xs = [e for e in events if e.get("ph") == "X" and "dur" in e]
  devices = {p for p, n in procs.items() if "/device:" in n}
  if devices:
    on = [e for e in xs if e["pid"] in devices]
    names = {threads.get((e["pid"], e["tid"]), "") for e in on}
    for prefix in ("Stream", "XLA Ops"):
      if any(n.startswith(prefix) for n in names):
        keep = {n for n in names if n.startswith(prefix)}
        on = [e for e in on
              if threads.get((e["pid"], e["tid"]), "") in keep]
        break
    return on, "device"
  return [e for e in xs if (e.get("args") or {}).get("hlo_op")
          and not e["name"].startswith("end: ")], "host threads"


def summarize(trace: dict, instructions: dict, steps: int, depth: int = 3,
              top: int = 25, model: str = "AVSegFormer") -> dict:
  """Kernel time per step by component, kind and kernel (milliseconds)."""
  events, where = kernel_events(trace)
  by_comp, by_kind = collections.Counter(), collections.Counter()
  by_kernel, counts = collections.Counter(), collections.Counter()
  unmapped = 0.0
  # Without an hlo_op, a GPU kernel is named after its fusion, '.'/'-' as '_'.
  sanitized = {re.sub(r"[.\-]", "_", k): k for k in instructions}
  for e in events:
    hlo_op = (e.get("args") or {}).get("hlo_op") or e["name"]
    hlo_op = hlo_op if hlo_op in instructions else sanitized.get(hlo_op,
                                                                 hlo_op)
    opcode, op_name, kind = instructions.get(hlo_op, (None, "", None))
    if opcode is None:
      unmapped += e["dur"]
      kind = "memcpy" if "memcpy" in e["name"].lower() else "(unmapped)"
    by_comp[component(op_name, depth, model) if opcode else kind] += \
        e["dur"]
    by_kind[kind] += e["dur"]
    by_kernel[hlo_op] += e["dur"]
    counts[hlo_op] += 1
  ms = lambda us: us / 1e3 / steps   # noqa: E731  (trace times are in us)
  kernel_us = sum(e["dur"] for e in events)
  return dict(
      where=where, kernels_per_step=len(events) / steps,
      kernel_ms=ms(kernel_us),
      busy_ms=ms(_union((e["ts"], e["ts"] + e["dur"]) for e in events)),
      unmapped_ms=ms(unmapped),
      components=[(k, ms(v)) for k, v in by_comp.most_common()],
      kinds=[(k, ms(v)) for k, v in by_kind.most_common()],
      top=[dict(kernel=k, ms=ms(v), calls=counts[k] / steps,
                kind=instructions.get(k, (None, "", "(unmapped)"))[2],
                component=component(instructions.get(k, ("", ""))[1],
                                    depth, model))
           for k, v in by_kernel.most_common(top)])


def profile(a) -> dict:
  """Compile the step, run it, trace `a.steps` more; the summary dict."""
  from avsegformer_jax import train
  config, row, mesh, steps_fn, state = bench_model.setup(
      a.config, a.dtype, a.remat, a.scan, a.batch, a.batch,
      bench_model.given_overrides(a))
  if a.phase == "eval":
    args = bench_model.eval_inputs(config, state, a.batch, mesh)
    jitted = steps_fn._eval
  else:
    if a.phase == "unfrozen":
      state = train.unfreeze_backbone(state, config)
    args = (state, train.shard_batch(
        bench_model.random_batch(config, a.batch), mesh))
    jitted = steps_fn._train
  with common.compiling():
    compiled, row["compile_s"], _ = common.aot_compile(jitted, *args)
  held = {"args": args}

  def step():
    out = compiled(*held["args"])
    if a.phase != "eval":                       # the state is donated
      held["args"] = (out[0],) + held["args"][1:]
    return out

  with tempfile.TemporaryDirectory(prefix="bench_profile_") as tmp:
    return _traced(a, compiled, step, row, a.trace_dir or tmp)


def _traced(a, compiled, step, row, trace_dir) -> dict:
  """Warm up, time `a.steps` untraced, trace `a.steps`; summarize."""
  with common.device_to_itself():
    common.timed(step, 2)                         # warm up
    times, _ = common.timed(step, a.steps)        # untraced
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(a.steps):
        jax.block_until_ready(step())
      traced_s = (time.perf_counter() - t0) / a.steps
  found = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"),
                    recursive=True)
  if not found:
    raise SystemExit(f"no perfetto_trace.json.gz under {trace_dir}: the "
                     "profiler wrote no trace")
  with gzip.open(max(found, key=os.path.getmtime)) as f:
    trace = json.load(f)
  out = summarize(trace, hlo_instructions(compiled.as_text()), a.steps,
                  a.depth, a.top)
  out.update(step_ms=common.summary(times)["median_s"] * 1e3,
             traced_step_ms=traced_s * 1e3, trace_dir=a.trace_dir or None,
             **row)
  if not out["kernels_per_step"]:
    raise SystemExit("the trace holds no kernels of the step (on CPU, "
                     "XLA_FLAGS needs --xla_cpu_enable_xprof_traceme=true "
                     "before JAX starts)")
  return out


def report(p: dict) -> str:
  lines = [
      f"{p['config']} {p['dtype']} {p['phase']} batch {p['batch']}: step "
      f"{p['step_ms']:.1f} ms ({p['traced_step_ms']:.1f} ms traced); "
      f"{p['kernels_per_step']:.0f} kernels on the {p['where']}, "
      f"{p['kernel_ms']:.1f} ms of kernels, busy {p['busy_ms']:.1f} ms = "
      f"{p['busy_ms'] / p['traced_step_ms']:.0%} of the traced step; "
      f"unmapped {p['unmapped_ms']:.1f} ms"]
  for title, rows in (("component", p["components"]), ("kind", p["kinds"])):
    lines.append(f"\n{'ms/step':>9}  {'share':>5}  by {title}")
    lines += [f"{v:9.2f}  {v / p['kernel_ms']:5.1%}  {k}"
              for k, v in rows[:p["top_n"]]]
  lines.append(f"\n{'ms/step':>9}  {'calls':>6}  top kernels")
  lines += [f"{t['ms']:9.2f}  {t['calls']:6.0f}  {t['kernel']}  "
            f"[{t['kind']}] {t['component']}" for t in p["top"]]
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.profile",
                              description=__doc__.split("\n")[0])
  p.add_argument("--config", default="s4_pvt2_224",
                 choices=sorted(bench_model.SPECS))
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--remat", type=lambda s: common.remat_list(s)[0],
                 default=True, help="false, true (full) or dots")
  p.add_argument("--scan", type=lambda s: common.bool_list(s)[0],
                 default=True)
  p.add_argument("--phase", default="unfrozen",
                 choices=bench_model.PHASES)
  p.add_argument("--batch", type=int, default=16, help="clips per step")
  p.add_argument("--steps", type=int, default=3, help="traced steps")
  p.add_argument("--depth", type=int, default=3,
                 help="module-path components per row")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--trace_dir", default="",
                 help="keep the trace here (default: a temporary folder, "
                      "removed)")
  p.add_argument("--json", default="")
  bench_model.add_override_flags(p)
  a = p.parse_args(argv)
  # XLA:CPU traces its thunks only when asked (read when the backend starts;
  # every XLA build knows the flag).
  if "xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_cpu_enable_xprof_traceme=true")
  xla_cpu.configure()
  out = profile(a)
  out.update(phase=a.phase, batch=a.batch, top_n=a.top,
             device=common.device_info())
  print(report(out))
  if a.json:
    common.write_json(a.json, out)
  return out


if __name__ == "__main__":
  main()
