"""A roofline estimate of a compiled step from XLA's optimized HLO: what the
step would take if every kernel ran at the device's peak FLOP/s or peak
memory bandwidth, whichever binds it, and which model parts own that time.

Why: without a device, the deviceless compile (`benchmarks/plan.py --target
h100`) still yields XLA:GPU's final kernels, so the model-FLOP utilisation a
step *can* reach, and where it is memory-bound, is known before a GPU is
lent. It is a bound, not a measurement: real kernels reach 60-80% of either
peak, launches cost microseconds, and autotuned GEMMs differ.

Per kernel (every instruction of a non-fused computation that launches work:
fusions, cuBLAS/cuDNN custom calls, copies, ...), times the trip counts of the
while loops around it (`known_trip_count`):
  FLOPs: GEMMs 2*M*N*K (batch included), convolutions 2*|out|*|filter|/O,
    cuDNN flash attention 2 (backward 5) GEMMs over its attention map;
  bytes: operands read + results written (a Pallas/Triton kernel's too: its
    gathers inside, from L2, are not counted), where a fusion that only slices a
    parameter (a scan reading layer i of stacked weights) reads the slice and
    one that updates a slice in place (a scan stacking residuals) writes it;
  ALU: a fusion's elementwise work, per element of each instruction in it:
    float ops at the FP32 rate, integer ops at the INT32 rate (64-bit ones
    2x, integer width conversions free, a shift-shift-or rotate 1), transcendentals (exp, log, tanh, erf, divide,
    rsqrt, ...) at the special-function rate, reductions per input element.
    Without it, a kernel that is bound by arithmetic that is not a GEMM
    looks free (dropout's threefry bits: ~80 integer ops per element);
  time: max(FLOPs / peak, bytes / bandwidth, ALU time).

    python -m benchmarks.roofline HLO.txt [--peak_tflops 989 --tbps 3.35]
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import re

_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
          "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8,
          "u64": 8, "f64": 8, "c64": 8, "c128": 16, "token": 0}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9][a-z0-9]*)?)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+)\s*=\s*(.*)$")
_HEADER = re.compile(r"^(ENTRY\s+)?%([^\s(]+)\s*\(")
_NO_KERNEL = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast",
              "while", "call", "conditional", "after-all", "partition-id",
              "replica-id", "opt-barrier", "add-dependency", "domain",
              "copy-start", "copy-done", "async-done", "async-update",
              "fusion-done"}
# XLA:GPU in jax 0.12 runs some fusions (a scan's in-place stacking) as an
# async pair: `fusion-start` is the kernel, `fusion-done` only waits for it.
_FUSIONS = {"fusion", "fusion-start"}
_SLICES = {"dynamic-slice", "slice"}
# Op-name tokens that say how (scan, remat, a jaxpr evaluated by JAX: jax 0.12
# adds `eval_jaxpr` in scanned remat layers), not where; profile.py too.
NAME_PLUMBING = frozenset({"while", "body", "closed_call", "checkpoint",
                           "rematted_computation", "eval_jaxpr"})
_GROUP_SKIP = NAME_PLUMBING | {"remat"}
# An unrolled layer's index (`block3_12`, `layers_4`); profile.py too.
LAYER_INDEX = re.compile(r"_\d+$")
# Instructions inside a fusion that move or index data but compute nothing
# per element (dots and convolutions are FLOPs, counted apart).
_NO_ALU = {"parameter", "constant", "broadcast", "bitcast", "reshape", "slice",
           "dynamic-slice", "dynamic-update-slice", "tuple", "iota",
           "get-tuple-element", "transpose", "copy", "concatenate", "pad",
           "gather", "scatter", "reverse", "bitcast-convert", "dot",
           "convolution", "fusion", "custom-call"}
_SFU = {"exponential", "exponential-minus-one", "log", "log-plus-one", "tanh",
        "logistic", "rsqrt", "sqrt", "cbrt", "sine", "cosine", "tan", "power",
        "divide", "erf", "atan2", "remainder"}
_INT = {"pred", "s8", "u8", "s16", "u16", "s32", "u32", "s64", "u64"}
# Elementwise throughput (per second) of the SXM H100/H200: 132 SMs at
# 1.98 GHz, 128 FP32 / 64 INT32 / 16 special-function lanes per SM.
ALU_H100 = {"fp": 132 * 128 * 1.98e9, "int": 132 * 64 * 1.98e9,
            "sfu": 132 * 16 * 1.98e9}


def _shapes(type_str):
  """[(dtype, dims)] of an HLO type; tuples flattened."""
  out = []
  for dt, dims in _SHAPE.findall(type_str):
    if dt.startswith("f8"):
      dt = "s8"
    if dt in _BYTES:
      out.append((dt, [int(d) for d in dims.split(",") if d]))
  return out


def _nbytes(shapes):
  return sum(_BYTES[dt] * math.prod(d) for dt, d in shapes)


def _split_type(rest):
  """'TYPE opcode(...), attrs' -> (TYPE, 'opcode(...), attrs')."""
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  i = rest.index(" ")
  return rest[:i], rest[i + 1:].lstrip()


class Instr:
  __slots__ = ("name", "type", "shapes", "opcode", "args", "operands",
               "attrs", "root")

  def __init__(self, name, rest, root):
    self.name, self.root = name, root
    self.type, rest = _split_type(rest)
    self.shapes = _shapes(self.type)
    i = rest.index("(")
    self.opcode = rest[:i]
    depth = 0
    for j in range(i, len(rest)):
      depth += rest[j] == "("
      depth -= rest[j] == ")"
      if depth == 0:
        break
    self.args = rest[i + 1:j]
    self.operands = re.findall(r"%([^\s,()]+)", self.args)
    self.attrs = rest[j + 1:]

  def attr(self, key):
    m = re.search(rf"\b{key}=%?([^\s,]+)", self.attrs)
    return m.group(1) if m else None


def parse(text):
  """{computation: [Instr]} and the entry computation's name."""
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    if not line.startswith(" "):
      m = _HEADER.match(line)
      if m:
        cur = comps.setdefault(m.group(2), [])
        entry = m.group(2) if m.group(1) else entry
      continue
    m = _INSTR.match(line)
    if m and cur is not None:
      cur.append(Instr(m.group(1), m.group(2),
                       line.lstrip().startswith("ROOT ")))
  return comps, entry


def _trip_count(comps, loop) -> int:
  """XLA:GPU's `known_trip_count`; else (XLA:TPU gives none) the N of a
  condition `counter < N` with a constant N: JAX's scans count 0..N-1."""
  n = re.search(r'"known_trip_count":\{"n":"(\d+)"', loop.attrs)
  if n:
    return int(n.group(1))
  cond = {i.name: i for i in comps.get(loop.attr("condition"), ())}
  root = next((i for i in cond.values() if i.root), None)
  if root is not None and root.opcode == "compare" and "direction=LT" in \
      root.attrs:
    c = cond.get(root.operands[-1])
    if c is not None and c.opcode == "constant" and c.args.isdigit():
      return int(c.args)
  return 1


def _multipliers(comps, entry):
  """How many times each non-fused computation runs per step."""
  mult = collections.Counter()
  stack = [(entry, 1)]
  while stack:
    name, k = stack.pop()
    mult[name] += k
    for ins in comps.get(name, ()):
      if ins.opcode == "while":
        stack.append((ins.attr("body"), k * _trip_count(comps, ins)))
      elif ins.opcode in ("call", "async-start"):
        stack.append((ins.attr("to_apply") or ins.attr("calls"), k))
      elif ins.opcode == "conditional":
        m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
        for b in re.findall(r"%([^\s,]+)", m.group(1) if m else ""):
          stack.append((b, k))
  return mult


def _fusion_bytes(ins, shapes_of, comps):
  """Bytes a fusion moves: sliced parameters count their slices, in-place
  dynamic-update-slices their updates, the rest in full."""
  body = {i.name: i for i in comps.get(ins.attr("calls"), ())}
  by_index, users = {}, collections.defaultdict(list)
  for i in body.values():
    if i.opcode == "parameter":
      by_index[int(i.args)] = i.name
    for o in i.operands:
      users[o].append(i)
  def source(name):          # through bitcasts (layout-only, no traffic)
    while name in body and body[name].opcode == "bitcast":
      name = body[name].operands[0]
    return name

  def readers(name):          # users, seen through bitcasts
    out = []
    for u in users.get(name, []):
      out += readers(u.name) if u.opcode == "bitcast" else [u]
    return out

  root = next((i for i in body.values() if i.root), None)
  roots = ([body[o] for o in root.operands if o in body]
           if root is not None and root.opcode == "tuple" else [root])
  written, in_place = 0, set()
  for r in roots:
    r = body.get(source(r.name)) if r is not None else None
    if r is not None and r.opcode == "dynamic-update-slice":
      upd = body.get(r.operands[1])
      written += _nbytes(upd.shapes) if upd else 0
      in_place.add(source(r.operands[0]))
    elif r is not None:
      written += _nbytes(r.shapes)
  read = 0
  for idx, op in enumerate(ins.operands):
    pname = by_index.get(idx)
    if pname in in_place:
      continue
    us = readers(pname)
    if us and all(u.opcode in _SLICES and source(u.operands[0]) == pname
                  for u in us):
      read += sum(_nbytes(u.shapes) for u in us)
    else:
      read += _nbytes(shapes_of.get(op, []))
  return read + written


def _conv_flops(ins, shapes_of, out):
  """2 * |forward output| * |filter| / output features, whichever operand
  plays which role in cuDNN's forward / backward-input / backward-filter."""
  target = ins.attr("custom_call_target") or ""
  ops = [shapes_of.get(o, [("f32", [])])[0][1] for o in ins.operands]
  if "BackwardInput" in target:
    y, w = ops[0], ops[1]
  elif "BackwardFilter" in target:
    y, w = ops[1], out
  else:
    y, w = out, ops[1]
  labels = ins.attr("dim_labels") or ""
  filt = labels.split("_")[1].split("->")[0] if "_" in labels else ""
  o = w[filt.index("o")] if "o" in filt and len(filt) == len(w) else 1
  return 2 * math.prod(y) * math.prod(w) / max(o, 1)


def _dot_flops(ins, shapes_of, out):
  """2 * |output| * contracted size, from the dot's (or cuBLAS call's)
  dimension numbers."""
  lhs = shapes_of.get(ins.operands[0], [("f32", [])])[0][1]
  m = (re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
       or re.search(r"lhs_contracting_dims=\{([^}]*)\}", ins.attrs))
  dims = [int(d) for d in re.findall(r"\d+", m.group(1))] if m else []
  return 2 * math.prod(out) * math.prod(lhs[d] for d in dims)


_FMHA_MAP = re.compile(
    r'"intermediate_tensor_shape":\s*\{"element_type":\s*"\w+",\s*'
    r'"dimensions":\s*\[([^\]]*)\]')


def _fmha_flops(ins, shapes_of, target):
  """cuDNN flash attention: its two GEMMs per [B,h,Lq,Lk] map element and
  head channel forward (q k^T, p v); five backward (q k^T again, dO v^T,
  p^T dO, dS k, dS^T q). The map itself never reaches memory."""
  m = _FMHA_MAP.search(ins.attrs)
  q = shapes_of.get(ins.operands[0], [("bf16", [])])[0][1]
  if not m or not q:
    return 0.0
  gemms = 5 if "Backward" in target else 2
  return gemms * 2 * math.prod(int(d) for d in re.findall(r"\d+", m.group(1))) \
      * q[-1]


def _flops(ins, shapes_of, out, target=""):
  if "$fmha" in target:
    return _fmha_flops(ins, shapes_of, target)
  if ins.opcode == "dot" or "matmul" in target or "gemm" in target:
    return _dot_flops(ins, shapes_of, out)
  if ins.opcode == "convolution" or "$conv" in target:
    return _conv_flops(ins, shapes_of, out)
  return 0.0


def _fused_flops(name, comps):
  """GEMMs and convolutions inside a fusion (XLA:CPU output fusions, Triton
  GEMM fusions on GPU), nested fusions included."""
  instrs = comps.get(name, ())
  shapes_of = {i.name: i.shapes for i in instrs}
  total = 0.0
  for i in instrs:
    if i.opcode == "fusion":
      total += _fused_flops(i.attr("calls"), comps)
    elif i.opcode in ("dot", "convolution"):
      total += _flops(i, shapes_of, i.shapes[0][1] if i.shapes else [])
  return total


def _fused_alu(name, comps, alu):
  """Seconds of elementwise arithmetic in a fusion (nested ones included)
  at the `alu` rates (module doc)."""
  instrs = comps.get(name, ())
  by_name = {i.name: i for i in instrs}
  shapes_of = {i.name: i.shapes for i in instrs}
  # or(shl(x, c), shr(x, 32 - c)) is a rotate: one funnel shift on a GPU.
  rotate_parts = set()
  for i in instrs:
    ops = [by_name.get(o) for o in i.operands]
    if (i.opcode == "or" and len(ops) == 2 and all(ops) and
        {o.opcode for o in ops} == {"shift-left", "shift-right-logical"} and
        ops[0].operands[:1] == ops[1].operands[:1]):
      rotate_parts.update(o.name for o in ops)
  secs = 0.0
  for i in instrs:
    if i.opcode == "fusion":
      secs += _fused_alu(i.attr("calls"), comps, alu)
      continue
    if i.opcode in _NO_ALU or not i.shapes or i.name in rotate_parts:
      continue
    dt, dims = i.shapes[0]
    n = math.prod(dims)
    if i.opcode == "reduce":            # one op per element reduced
      src = shapes_of.get(i.operands[0], []) if i.operands else []
      n = math.prod(src[0][1]) if src else n
    if i.opcode in _SFU:
      secs += n / alu["sfu"]
    elif dt in _INT:
      src = shapes_of.get(i.operands[0], []) if i.operands else []
      if i.opcode == "convert" and src and src[0][0] in _INT:
        continue                        # widen / narrow: register moves
      secs += n * (2 if dt.endswith("64") else 1) / alu["int"]
    else:
      secs += n / alu["fp"]
  return secs


def _group(ins, depth):
  """Model part from the op name: 'backbone' or 'head/transformer/encoder'
  (+ ' bwd' under transpose), 'optimizer' for what is outside the model.
  Layer indices go (block3_12 -> block3: unrolled layers group as scanned
  ones do), and the path is read after the model's last mention (an
  unrolled rematerialised layer's names repeat the path to it)."""
  m = re.search(r'op_name="([^"]*)"', ins.attrs)
  name = m.group(1) if m else ""
  bwd = "transpose(" in name
  parts = [p for p in re.sub(r"\w+\(|\)", "", name).split("/")
           if p and p not in _GROUP_SKIP]
  if "AVSegFormer" in parts:
    parts = parts[len(parts) - parts[::-1].index("AVSegFormer"):]
    parts = [LAYER_INDEX.sub("", p) for p in parts]
    key = "/".join(parts[:depth]) if parts else "model"
  else:
    key = "(no metadata)" if not name else "outside the model (loss, optimizer)"
  return key + (" bwd" if bwd else "")


def estimate(text, peak_flops=989e12, bandwidth=3.35e12, depth=3,
             alu=ALU_H100) -> dict:
  """Roofline of one compiled module's HLO text (see the module doc);
  `alu=None` leaves elementwise arithmetic out (two roofs)."""
  comps, entry = parse(text)
  mult = _multipliers(comps, entry)
  groups = collections.defaultdict(lambda: collections.Counter())
  tot = collections.Counter()
  for cname, k in mult.items():
    instrs = comps.get(cname, ())
    shapes_of = {i.name: i.shapes for i in instrs}
    for ins in instrs:
      if ins.opcode in _NO_KERNEL:
        continue
      alu_s = 0.0
      if ins.opcode in _FUSIONS:
        flops = _fused_flops(ins.attr("calls"), comps)
        nbytes = _fusion_bytes(ins, shapes_of, comps)
        alu_s = _fused_alu(ins.attr("calls"), comps, alu) if alu else 0.0
      else:
        flops = _flops(ins, shapes_of, ins.shapes[0][1] if ins.shapes else [],
                       ins.attr("custom_call_target") or "")
        # cuBLAS / cuDNN calls return (result, s8/u8 workspace): not traffic.
        written = [s for s in ins.shapes if s[0] not in ("s8", "u8")] \
            if ins.opcode == "custom-call" else ins.shapes
        nbytes = _nbytes(written) + sum(
            _nbytes(shapes_of.get(o, [])) for o in ins.operands)
      roofs = {"compute_bound_s": flops / peak_flops,
               "memory_bound_s": nbytes / bandwidth, "alu_bound_s": alu_s}
      bound = max(roofs, key=roofs.get)
      t = roofs[bound]
      g = groups[_group(ins, depth)]
      for c in (g, tot):
        c["kernels"] += k
        c["flops"] += k * flops
        c["bytes"] += k * nbytes
        c["s"] += k * t
        c[bound] += k * t
  return dict(peak_flops=peak_flops, bandwidth=bandwidth,
              total={k: float(v) for k, v in tot.items()},
              groups={g: {k: float(v) for k, v in c.items()}
                      for g, c in sorted(groups.items(),
                                         key=lambda x: -x[1]["s"])})


def report(est, model_flops=None, top=12) -> str:
  t = est["total"]
  lines = [f"roofline: {t['s'] * 1e3:.2f} ms per step over "
           f"{int(t['kernels'])} kernel launches "
           f"({t.get('compute_bound_s', 0) * 1e3:.2f} ms compute-bound, "
           f"{t.get('memory_bound_s', 0) * 1e3:.2f} ms memory-bound, "
           f"{t.get('alu_bound_s', 0) * 1e3:.2f} ms elementwise-ALU-bound); "
           f"{t['flops'] / 1e12:.2f} TFLOP, {t['bytes'] / 1e9:.1f} GB moved"]
  if model_flops:
    lines.append(f"model FLOPs {model_flops / 1e12:.2f} T: MFU at most "
                 f"{model_flops / t['s'] / est['peak_flops']:.1%}")
  lines.append(f"{'part':<48} {'ms':>7} {'share':>6} {'mem-bound ms':>12} "
               f"{'ALU-bound ms':>12} {'GB':>7} {'TFLOP':>6} {'kernels':>7}")
  for g, c in list(est["groups"].items())[:top]:
    lines.append(f"{g[:48]:<48} {c['s'] * 1e3:7.2f} {c['s'] / t['s']:6.1%} "
                 f"{c.get('memory_bound_s', 0) * 1e3:12.2f} "
                 f"{c.get('alu_bound_s', 0) * 1e3:12.2f} "
                 f"{c['bytes'] / 1e9:7.2f} {c['flops'] / 1e12:6.2f} "
                 f"{int(c['kernels']):7d}")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.roofline",
                              description=__doc__.split("\n")[0])
  p.add_argument("hlo", help="optimized HLO text (compiled.as_text())")
  p.add_argument("--peak_tflops", type=float, default=989.0,
                 help="dense bf16 peak (H100/H200 SXM: 989)")
  p.add_argument("--tbps", type=float, default=3.35,
                 help="memory bandwidth, TB/s (H100 SXM 3.35, H200 4.8)")
  p.add_argument("--depth", type=int, default=3,
                 help="module-path levels per row")
  p.add_argument("--model_tflops", type=float, default=None)
  p.add_argument("--json", default="")
  a = p.parse_args(argv)
  with open(a.hlo) as f:
    est = estimate(f.read(), a.peak_tflops * 1e12, a.tbps * 1e12, a.depth)
  print(report(est, a.model_tflops and a.model_tflops * 1e12, top=40))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(est, f, indent=1)


if __name__ == "__main__":
  main()
