"""benchmarks/profile.py: kernels from a real XLA:CPU trace charged to the
flax modules that emitted them (forward, backward, recomputed forward), and
a device trace's streams counted once (GPU and TPU traces are built by hand
here: their layout, not their numbers, is what the parser depends on)."""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import profile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A two-module net whose second module is rematerialised, its loss's gradient
# compiled, run and traced on CPU in a fresh process (XLA:CPU traces its
# thunks only when the flag is set before the backend starts).
SCRIPT = r"""
import glob, gzip, json, sys
import flax.linen as nn, jax, jax.numpy as jnp
from benchmarks import profile

class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(512, name="enc")(x))
    return nn.remat(nn.Dense)(512, name="dec")(x)

net = Net()
x = jnp.ones((256, 512))
params = net.init(jax.random.PRNGKey(0), x)
loss = lambda p, x: jnp.sum(jnp.tanh(net.apply(p, x)) ** 2)
compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
jax.block_until_ready(compiled(params, x))
with jax.profiler.trace(sys.argv[1], create_perfetto_trace=True):
  for _ in range(2):
    jax.block_until_ready(compiled(params, x))
path = glob.glob(sys.argv[1] + "/**/perfetto_trace.json.gz", recursive=True)
trace = json.load(gzip.open(path[0]))
out = profile.summarize(trace, profile.hlo_instructions(compiled.as_text()),
                        steps=2, depth=2, model="Net")
print("SUMMARY", json.dumps(out))
"""


def test_cpu_trace_charges_kernels_to_modules_and_passes(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_cpu_enable_xprof_traceme=true")
  proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)],
                        capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = next(x for x in proc.stdout.splitlines()
              if x.startswith("SUMMARY "))
  out = json.loads(line[len("SUMMARY "):])
  assert out["where"] == "host threads" and out["kernels_per_step"] >= 3
  assert out["unmapped_ms"] == 0
  assert 0 < out["busy_ms"] <= out["kernel_ms"] * (1 + 1e-9)
  comps = dict(out["components"])
  # The forward's and the backward's GEMMs of both modules, each under its
  # own name; what the kernels took adds up over components and kinds.
  assert any(k.startswith("bwd enc") for k in comps), comps
  assert any(k.startswith("bwd dec") for k in comps), comps
  assert any(k.startswith(("fwd enc", "fwd dec")) for k in comps), comps
  assert dict(out["kinds"]).get("gemm", 0) > 0, out["kinds"]
  for rows in (out["components"], out["kinds"]):
    assert sum(v for _, v in rows) == pytest.approx(out["kernel_ms"])
  assert out["top"][0]["ms"] >= out["top"][-1]["ms"]


HLO = """\
HloModule jit_step

%fused_computation.7 (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  ROOT %m = f32[8]{0} multiply(%p, %p), metadata={op_name="jit(s)/transpose(jvp(AVSegFormer))/backbone/while/body/closed_call/block3/mlp/fc1/mul"}
}

ENTRY %main (a: f32[8], w: f32[8,8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %state_params__head____fc_0____kernel__.1 = f32[8,8]{1,0} parameter(1)
  %loop_fusion.3 = f32[8]{0} fusion(%a), kind=kLoop, calls=%fused_computation.7
  %dot.5 = f32[8]{0} dot(%loop_fusion.3, %state_params__head____fc_0____kernel__.1), lhs_contracting_dims={0}, rhs_contracting_dims={0}
  %custom-call.2 = f32[8]{0} custom-call(%dot.5), custom_call_target="__cudnn$fmhaSoftmax", metadata={op_name="jit(s)/jvp(AVSegFormer)/head/transformer/decoder/layers/cross_attn/dot_product_attention"}
  ROOT %all-reduce.1 = f32[8]{0} all-reduce(%custom-call.2), metadata={op_name="jit(s)/add"}
}
"""


def _gpu_trace():
  meta = [dict(ph="M", pid=1, name="process_name",
               args=dict(name="/device:GPU:0")),
          dict(ph="M", pid=1, tid=7, name="thread_name",
               args=dict(name="Stream #7(Compute)")),
          dict(ph="M", pid=1, tid=8, name="thread_name",
               args=dict(name="XLA Ops")),
          dict(ph="M", pid=2, name="process_name",
               args=dict(name="/host:CPU")),
          dict(ph="M", pid=2, tid=1, name="thread_name",
               args=dict(name="python"))]
  def ev(tid, ts, dur, name, op=None, pid=1):
    return dict(ph="X", pid=pid, tid=tid, ts=ts, dur=dur, name=name,
                args=dict(hlo_op=op) if op else {})
  kernels = [ev(7, 0, 10, "loop_fusion_3"),          # named, no hlo_op
             ev(7, 5, 10, "sm90_xmma_gemm_bf16", "dot.5"),    # overlaps
             ev(7, 30, 20, "cudnn_fmha_kernel", "custom-call.2"),
             ev(7, 60, 4, "ncclAllReduce", "all-reduce.1"),
             ev(7, 70, 6, "MemcpyD2H")]
  derived = [ev(8, 0, 15, "loop_fusion.3"), ev(8, 30, 20, "custom-call.2"),
             ev(1, 0, 100, "train_step", pid=2)]
  return dict(traceEvents=meta + kernels + derived)


def test_device_streams_counted_once_and_charged():
  out = profile.summarize(_gpu_trace(), profile.hlo_instructions(HLO),
                          steps=1, depth=3)
  assert out["where"] == "device" and out["kernels_per_step"] == 5
  assert out["kernel_ms"] == pytest.approx(0.050)       # 10+10+20+4+6 us
  assert out["busy_ms"] == pytest.approx(0.045)         # 0-15 overlapped
  assert out["unmapped_ms"] == pytest.approx(0.006)
  kinds = dict(out["kinds"])
  assert kinds == pytest.approx({
      "elementwise fusion": 0.010, "gemm": 0.010, "fused attention": 0.020,
      "collective": 0.004, "memcpy": 0.006})
  comps = dict(out["components"])
  # The fusion takes its fused computation's op_name; the weight-gradient
  # dot without metadata names the weight it reads.
  assert comps["bwd backbone/block3/mlp"] == pytest.approx(0.010)
  assert comps["(no metadata) head/fc_0"] == pytest.approx(0.010)
  assert comps["fwd head/transformer/decoder"] == pytest.approx(0.020)
  assert comps["step (outside the model)"] == pytest.approx(0.004)


def test_tpu_trace_uses_its_xla_ops_line():
  trace = _gpu_trace()
  for e in trace["traceEvents"]:   # no streams: a TPU's lines, where "XLA
    if e.get("name") == "thread_name" and e["tid"] == 7:   # Modules" spans
      e["args"]["name"] = "XLA Modules"                    # whole programs
  out = profile.summarize(trace, profile.hlo_instructions(HLO), steps=1)
  assert out["where"] == "device" and out["kernels_per_step"] == 2
  assert out["kernel_ms"] == pytest.approx(0.035)
  assert dict(out["kinds"])["fused attention"] == pytest.approx(0.020)


def test_jax_0_12_scanned_remat_names():
  """jax 0.12 adds `eval_jaxpr` to a scanned, rematerialised layer's op
  names: plumbing, not a module."""
  name = ("jit(train_step)/transpose(jvp(AVSegFormer))/backbone/while/body/"
          "eval_jaxpr/checkpoint/block3/mlp/fc1/dot_general")
  assert profile.component(name, 3) == "bwd backbone/block3/mlp"


def test_unrolled_remat_names():
  """Unrolled, rematerialised layers repeat the model's path in their op
  names and carry their index: grouped as the scanned layer."""
  head = ("jit(train_step)/transpose(jvp(AVSegFormer))/backbone/"
          "jvp(AVSegFormer)/backbone/checkpoint/")
  assert profile.component(head + "rematted_computation/block3_12/mlp/fc1/"
                           "dot_general", 3) == "remat backbone/block3/mlp"
  assert profile.component(head + "block3_12/mlp/fc1/transpose/dot_general",
                           3) == "bwd backbone/block3/mlp"
  assert profile.component("jit(train_step)/jvp(AVSegFormer)/head/"
                           "in_proj_0_0/add", 3) == "fwd head/in_proj_0"
