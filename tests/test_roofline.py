"""benchmarks/roofline.py: FLOPs and bytes of compiled HLO, per kernel and
times the trip counts of the loops around it."""
import jax
import jax.numpy as jnp
import pytest

from benchmarks import roofline


def _compiled_text(fn, *args):
  return jax.jit(fn).lower(*args).compile().as_text()


def test_scan_counts_every_trip_and_only_the_slices_it_touches():
  t, d = 16, 128
  act = d * d * 4                                        # one f32 [d, d]

  def f(x, ws):                                          # ws [t, d, d]
    def step(x, w):
      x = jnp.tanh(x @ w)
      return x, x
    return jax.lax.scan(step, x, ws)

  est = roofline.estimate(
      _compiled_text(f, jnp.ones((d, d)), jnp.ones((t, d, d))))
  total = est["total"]
  assert total["flops"] == t * 2 * d ** 3
  # Each step reads its weight slice and x and writes x and its row of ys: a
  # few activations. Counting the stacked [t, d, d] operands whole (the scan
  # reads layer i, writes row i) would add >= 2 * t activations per step.
  per_step = total["bytes"] / t / act
  assert 3 <= per_step <= 14, per_step


def test_nested_loops_multiply():
  def f(x):
    def inner(x, _):
      return x @ x, None

    def outer(x, _):
      return jax.lax.scan(inner, x, None, length=3)[0], None
    return jax.lax.scan(outer, x, None, length=5)[0]

  est = roofline.estimate(_compiled_text(f, jnp.ones((64, 64))))
  assert est["total"]["flops"] == 15 * 2 * 64 ** 3


def test_convolution_flops_forward_and_gradients():
  x, k = jnp.ones((2, 16, 16, 8)), jnp.ones((3, 3, 8, 32))

  def conv(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  macs = 2 * 16 * 16 * 32 * 3 * 3 * 8
  assert roofline.estimate(
      _compiled_text(conv, x, k))["total"]["flops"] == 2 * macs
  # d/dx and d/dk of a sum: two convolutions (the forward is dead code).
  grads = jax.grad(lambda x, k: conv(x, k).sum(), argnums=(0, 1))
  assert roofline.estimate(
      _compiled_text(grads, x, k))["total"]["flops"] == 2 * 2 * macs


# XLA:GPU's spelling (from a deviceless H100 compile, trimmed): cuBLAS and
# cuDNN custom calls with workspaces, a fusion that updates one row of a
# stacked buffer in place through a bitcast, inside a 40-trip loop.
_GPU_HLO = """\
HloModule jit_step

%fused_dus (param_0: bf16[40,16,64], param_1: s32[], param_2: bf16[16,64]) -> bf16[40,16,64] {
  %param_0 = bf16[40,16,64]{2,1,0} parameter(0)
  %bitcast.1 = bf16[40,16,64]{2,1,0} bitcast(%param_0)
  %param_2 = bf16[16,64]{1,0} parameter(2)
  %bitcast.2 = bf16[1,16,64]{2,1,0} bitcast(%param_2)
  %param_1 = s32[] parameter(1)
  %c = s32[] constant(0)
  ROOT %dus = bf16[40,16,64]{2,1,0} dynamic-update-slice(%bitcast.1, %bitcast.2, %param_1, %c, %c)
}

%body (arg: (s32[], bf16[40,16,64], bf16[16,32], bf16[64,32])) -> (s32[], bf16[40,16,64], bf16[16,32], bf16[64,32]) {
  %arg = (s32[], bf16[40,16,64]{2,1,0}, bf16[16,32]{1,0}, bf16[64,32]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %stack = bf16[40,16,64]{2,1,0} get-tuple-element(%arg), index=1
  %a = bf16[16,32]{1,0} get-tuple-element(%arg), index=2
  %b = bf16[64,32]{1,0} get-tuple-element(%arg), index=3
  %gemm = (bf16[16,64]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(step)/jvp(AVSegFormer)/backbone/while/body/closed_call/block3/mlp/fc1/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["1"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %y = bf16[16,64]{1,0} get-tuple-element(%gemm), index=0
  %upd = bf16[40,16,64]{2,1,0} fusion(%stack, %i, %y), kind=kLoop, calls=%fused_dus, metadata={op_name="jit(step)/jvp(AVSegFormer)/backbone/while/body/dynamic_update_slice"}
  ROOT %t = (s32[], bf16[40,16,64]{2,1,0}, bf16[16,32]{1,0}, bf16[64,32]{1,0}) tuple(%i, %upd, %a, %b)
}

%cond (arg: (s32[], bf16[40,16,64], bf16[16,32], bf16[64,32])) -> pred[] {
  %arg = (s32[], bf16[40,16,64]{2,1,0}, bf16[16,32]{1,0}, bf16[64,32]{1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (x: bf16[8,14,14,320], dy: bf16[8,7,7,320], init: (s32[], bf16[40,16,64], bf16[16,32], bf16[64,32])) -> bf16[320,2,2,320] {
  %x = bf16[8,14,14,320]{3,2,1,0} parameter(0)
  %dy = bf16[8,7,7,320]{3,2,1,0} parameter(1)
  %init = (s32[], bf16[40,16,64]{2,1,0}, bf16[16,32]{1,0}, bf16[64,32]{1,0}) parameter(2)
  %w = (s32[], bf16[40,16,64]{2,1,0}, bf16[16,32]{1,0}, bf16[64,32]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"40"}}
  %dw = (bf16[320,2,2,320]{3,2,1,0}, u8[0]{0}) custom-call(%x, %dy), window={size=2x2 stride=2x2}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(step)/transpose(jvp(AVSegFormer))/backbone/while/body/closed_call/block3/attn/sr/conv_general_dilated"}
  ROOT %r = bf16[320,2,2,320]{3,2,1,0} get-tuple-element(%dw), index=0
}
"""


def test_gpu_custom_calls_and_in_place_updates():
  est = roofline.estimate(_GPU_HLO, peak_flops=1e15, bandwidth=1e12)
  gemm_flops = 40 * 2 * 16 * 64 * 32
  conv_flops = 2 * (8 * 7 * 7 * 320) * (320 * 2 * 2 * 320) / 320
  assert est["total"]["flops"] == pytest.approx(gemm_flops + conv_flops)
  assert est["total"]["kernels"] == 40 * 2 + 1
  # Per trip: the GEMM reads a, b and writes y (its workspace is not
  # traffic); the update reads y and writes one row of the stack in place.
  row = 16 * 64 * 2
  gemm_bytes = (16 * 32 + 64 * 32) * 2 + row
  upd_bytes = row + 4 + row
  conv_bytes = (8 * 14 * 14 * 320 + 8 * 7 * 7 * 320 + 320 * 4 * 320) * 2
  assert est["total"]["bytes"] == 40 * (gemm_bytes + upd_bytes) + conv_bytes
  groups = est["groups"]
  assert set(groups) == {"backbone/block3/mlp", "backbone/dynamic_update_slice",
                         "backbone/block3/attn bwd"}
  assert groups["backbone/block3/attn bwd"]["kernels"] == 1


# Elementwise arithmetic (the third roof): a rotate idiom, an integer width
# conversion, a 64-bit op, an exp and a reduction, in a nested fusion.
_ALU_HLO = """\
HloModule jit_alu

%inner (p0: u32[1000]) -> u32[1000] {
  %p0 = u32[1000]{0} parameter(0)
  %c13 = u32[1000]{0} constant({...})
  %c19 = u32[1000]{0} constant({...})
  %shl = u32[1000]{0} shift-left(%p0, %c13)
  %shr = u32[1000]{0} shift-right-logical(%p0, %c19)
  %rot = u32[1000]{0} or(%shl, %shr)
  ROOT %x = u32[1000]{0} xor(%rot, %p0)
}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%fused (q0: u32[1000], q1: f32[1000]) -> (u64[1000], f32[]) {
  %q0 = u32[1000]{0} parameter(0)
  %n = u32[1000]{0} fusion(%q0), kind=kLoop, calls=%inner
  %w = u64[1000]{0} convert(%n)
  %m = u64[1000]{0} multiply(%w, %w)
  %q1 = f32[1000]{0} parameter(1)
  %e = f32[1000]{0} exponential(%q1)
  %z = f32[] constant(0)
  %r = f32[] reduce(%e, %z), dimensions={0}, to_apply=%add
  ROOT %t = (u64[1000]{0}, f32[]) tuple(%m, %r)
}

ENTRY %main (x: u32[1000], y: f32[1000]) -> (u64[1000], f32[]) {
  %x = u32[1000]{0} parameter(0)
  %y = f32[1000]{0} parameter(1)
  ROOT %f = (u64[1000]{0}, f32[]) fusion(%x, %y), kind=kLoop, calls=%fused
}
"""


def test_elementwise_arithmetic_is_a_third_roof():
  alu = {"fp": 1e9, "int": 1e8, "sfu": 1e7}
  est = roofline.estimate(_ALU_HLO, peak_flops=1e15, bandwidth=1e15, alu=alu)
  # rotate 1 + xor 1 (u32), convert free, 64-bit multiply 2, per element;
  # exp at the special-function rate; the reduction one add per input.
  want = 1000 * (4 / 1e8 + 1 / 1e7 + 1 / 1e9)
  assert est["total"]["s"] == pytest.approx(want)
  assert est["total"]["alu_bound_s"] == pytest.approx(want)
  two_roofs = roofline.estimate(_ALU_HLO, peak_flops=1e15, bandwidth=1e15,
                                alu=None)
  assert two_roofs["total"]["s"] < want / 1000



# cuDNN flash attention (`model.attention_impl="cudnn"`) as XLA:GPU emits it
# (shortened from a deviceless H100 compile of its gradient).
_CFG = ('backend_config={"cudnn_fmha_backend_config": {"fmha_scale": 0.35, '
        '"intermediate_tensor_shape": {"element_type": "BF16", '
        '"dimensions": ["2", "4", "16", "24"], "tuple_shapes": []}, '
        '"is_flash_attention": true, "mask_type": "PADDING"}}')
_FMHA_HLO = f"""\
HloModule jit_attention

ENTRY %main (q: bf16[2,16,4,8], k: bf16[2,24,4,8], v: bf16[2,24,4,8], n: s32[2], do: bf16[2,16,4,8]) -> bf16[2,4,16,8] {{
  %q = bf16[2,16,4,8]{{3,2,1,0}} parameter(0)
  %k = bf16[2,24,4,8]{{3,2,1,0}} parameter(1)
  %v = bf16[2,24,4,8]{{3,2,1,0}} parameter(2)
  %n = s32[2]{{0}} parameter(3)
  %do = bf16[2,16,4,8]{{3,2,1,0}} parameter(4)
  %fwd = (bf16[2,4,16,8]{{3,1,2,0}}, f32[2,4,16]{{2,1,0}}, u8[0]{{0}}) custom-call(%q, %k, %v, %n, %n), custom_call_target="__cudnn$fmhaSoftmax", {_CFG}
  %o = bf16[2,4,16,8]{{3,1,2,0}} get-tuple-element(%fwd), index=0
  %s = f32[2,4,16]{{2,1,0}} get-tuple-element(%fwd), index=1
  %bwd = (bf16[2,4,16,8]{{3,1,2,0}}, bf16[2,4,24,8]{{3,1,2,0}}, bf16[2,4,24,8]{{3,1,2,0}}, u8[0]{{0}}) custom-call(%q, %k, %v, %s, %do, %o, %n, %n), custom_call_target="__cudnn$fmhaSoftmaxBackward", {_CFG}
  ROOT %dq = bf16[2,4,16,8]{{3,1,2,0}} get-tuple-element(%bwd), index=0
}}
"""


def test_flash_attention_flops_and_bytes():
  est = roofline.estimate(_FMHA_HLO, peak_flops=1e15, bandwidth=1e12)
  per_gemm = 2 * (2 * 4 * 16 * 24) * 8
  assert est["total"]["flops"] == 2 * per_gemm + 5 * per_gemm
  assert est["total"]["kernels"] == 2
  # Only q, k, v, lengths, outputs and softmax statistics move: the
  # [2, 4, 16, 24] map stays on chip.
  q, kv, stats, n = 2 * 16 * 4 * 8 * 2, 2 * 24 * 4 * 8 * 2, 2 * 4 * 16 * 4, 8
  fwd = q + 2 * kv + 2 * n + q + stats
  bwd = q + 2 * kv + stats + q + q + 2 * n + q + 2 * kv
  assert est["total"]["bytes"] == fwd + bwd


def test_async_fusion_pair_is_one_kernel():
  """jax 0.12's XLA:GPU runs a scan's in-place stacking as fusion-start /
  fusion-done: the same one kernel and bytes as the plain fusion (counted in
  full, it made the S4 train step's bound 51.5 ms instead of 32.5)."""
  plain = ("  %upd = bf16[40,16,64]{2,1,0} fusion(%stack, %i, %y), kind=kLoop, "
           "calls=%fused_dus, ")
  assert plain in _GPU_HLO
  async_pair = (
      "  %upd-start = ((bf16[40,16,64]{2,1,0}, s32[], bf16[16,64]{1,0}), "
      "bf16[40,16,64]{2,1,0}, u32[]) fusion-start(%stack, %i, %y), "
      "kind=kLoop, calls=%fused_dus, ")
  text = _GPU_HLO.replace(plain, async_pair).replace(
      "\n  ROOT %t = ", "\n  %upd = bf16[40,16,64]{2,1,0} "
      "fusion-done(%upd-start)\n  ROOT %t = ")
  kw = dict(peak_flops=1e15, bandwidth=1e12)
  assert roofline.estimate(text, **kw) == roofline.estimate(_GPU_HLO, **kw)


def test_scanned_remat_name_stack_of_jax_0_12():
  """jax 0.12 puts `eval_jaxpr` in a scanned, rematerialised layer's op
  names; it says how, not where, like `checkpoint`."""
  line = ('%f = bf16[8]{0} fusion(%a), kind=kLoop, calls=%c, metadata={op_name='
          '"jit(train_step)/transpose(jvp(AVSegFormer))/backbone/while/body/'
          'eval_jaxpr/checkpoint/block3/mlp/fc1/dot_general"}')
  comps, _ = roofline.parse("ENTRY %main () -> bf16[8] {\n  " + line + "\n}\n")
  ins = comps["main"][0]
  assert roofline._group(ins, 2) == "backbone/block3 bwd"


def test_unrolled_layers_group_as_scanned_ones():
  """An unrolled, rematerialised layer's op names repeat the model's path
  (`.../backbone/jvp(AVSegFormer)/backbone/...`) and carry the layer index:
  both go, so the parts read as the scanned step's."""
  names = {
      "bwd": "jit(train_step)/transpose(jvp(AVSegFormer))/backbone/"
             "jvp(AVSegFormer)/backbone/checkpoint/block3_12/mlp/fc1/dot_general",
      "fwd": "jit(train_step)/jvp(AVSegFormer)/head/transformer/encoder/"
             "jvp(AVSegFormer)/head/transformer/encoder/checkpoint/layers_4/"
             "self_attn/dot_general"}
  groups = {}
  for how, name in names.items():
    line = (f'%f = bf16[8]{{0}} fusion(%a), kind=kLoop, calls=%c, '
            f'metadata={{op_name="{name}"}}')
    comps, _ = roofline.parse("ENTRY %main () -> bf16[8] {\n  " + line + "\n}\n")
    groups[how] = roofline._group(comps["main"][0], 4)
  assert groups == {"bwd": "backbone/block3/mlp/fc1 bwd",
                    "fwd": "head/transformer/encoder/layers"}
