"""benchmarks/tpu_cost.py: XLA:TPU's per-kernel cycle estimates summed over a
step, on HLO in the form a deviceless v5e compile prints (libtpu is not
installed here: the text below follows a real dump's lines)."""
import pytest

from benchmarks import roofline
from benchmarks import tpu_cost

_LAYER = 'metadata={op_name="jit(train_step)/AVSegFormer/head/%s"}'
_CYCLES = 'backend_config={"flag_configs":[],"estimated_cycles":"%d"}'
# A scanned layer (4 trips, no known_trip_count: XLA:TPU gives none) holding
# one estimated fusion and one gather without an estimate; beside it one
# estimated fusion, an async slice (a DMA), and a layout-only custom call.
HLO = f"""HloModule jit_train_step, entry_computation_layout={{}}

%fused_computation.1 (param_0.1: bf16[64,256]) -> bf16[64,256] {{
  %param_0.1 = bf16[64,256]{{1,0:T(8,128)(2,1)}} parameter(0)
  ROOT %tanh.1 = bf16[64,256]{{1,0:T(8,128)(2,1)}} tanh(%param_0.1)
}}

%fused_computation.2 (param_0.2: bf16[64,32], param_1.2: s32[8,1]) -> bf16[8,32] {{
  %param_0.2 = bf16[64,32]{{1,0:T(8,128)(2,1)}} parameter(0)
  %param_1.2 = s32[8,1]{{1,0:T(8,128)}} parameter(1)
  ROOT %gather.2 = bf16[8,32]{{1,0:T(8,128)(2,1)}} gather(%param_0.2, %param_1.2), offset_dims={{1}}, collapsed_slice_dims={{0}}, start_index_map={{0}}, index_vector_dim=1, slice_sizes={{1,32}}
}}

%body (arg.1: (s32[], bf16[64,256], bf16[64,32], s32[8,1])) -> (s32[], bf16[64,256], bf16[64,32], s32[8,1]) {{
  %arg.1 = (s32[]{{:T(128)}}, bf16[64,256]{{1,0:T(8,128)(2,1)}}, bf16[64,32]{{1,0:T(8,128)(2,1)}}, s32[8,1]{{1,0:T(8,128)}}) parameter(0)
  %gte.0 = s32[]{{:T(128)}} get-tuple-element(%arg.1), index=0
  %gte.1 = bf16[64,256]{{1,0:T(8,128)(2,1)}} get-tuple-element(%arg.1), index=1
  %gte.2 = bf16[64,32]{{1,0:T(8,128)(2,1)}} get-tuple-element(%arg.1), index=2
  %gte.3 = s32[8,1]{{1,0:T(8,128)}} get-tuple-element(%arg.1), index=3
  %fusion.1 = bf16[64,256]{{1,0:T(8,128)(2,1)}} fusion(%gte.1), kind=kLoop, calls=%fused_computation.1, {_LAYER % "decoder/while/body/closed_call/layers/tanh"}, {_CYCLES % 3000}
  %gather_fusion.2 = bf16[8,32]{{1,0:T(8,128)(2,1)}} fusion(%gte.2, %gte.3), kind=kCustom, calls=%fused_computation.2, {_LAYER % "transformer/encoder/while/body/layers/gather"}
  %one = s32[]{{:T(128)}} constant(1)
  %next = s32[]{{:T(128)}} add(%gte.0, %one), {_CYCLES % 1}
  ROOT %t = (s32[]{{:T(128)}}, bf16[64,256]{{1,0:T(8,128)(2,1)}}, bf16[64,32]{{1,0:T(8,128)(2,1)}}, s32[8,1]{{1,0:T(8,128)}}) tuple(%next, %fusion.1, %gte.2, %gte.3)
}}

%cond (arg.2: (s32[], bf16[64,256], bf16[64,32], s32[8,1])) -> pred[] {{
  %arg.2 = (s32[]{{:T(128)}}, bf16[64,256]{{1,0:T(8,128)(2,1)}}, bf16[64,32]{{1,0:T(8,128)(2,1)}}, s32[8,1]{{1,0:T(8,128)}}) parameter(0)
  %i = s32[]{{:T(128)}} get-tuple-element(%arg.2), index=0
  %n = s32[]{{:T(128)}} constant(4)
  ROOT %lt = pred[]{{:T(512)}} compare(%i, %n), direction=LT
}}

ENTRY %main (p.0: bf16[64,256], p.1: bf16[64,32], p.2: s32[8,1], p.3: bf16[64,256]) -> bf16[64,256] {{
  %p.0 = bf16[64,256]{{1,0:T(8,128)(2,1)}} parameter(0)
  %p.1 = bf16[64,32]{{1,0:T(8,128)(2,1)}} parameter(1)
  %p.2 = s32[8,1]{{1,0:T(8,128)}} parameter(2)
  %p.3 = bf16[64,256]{{1,0:T(8,128)(2,1)}} parameter(3)
  %slice-start.1 = ((bf16[64,256]{{1,0:T(8,128)(2,1)}}), bf16[64,128]{{1,0:T(8,128)(2,1)S(1)}}, s32[]{{:S(2)}}) slice-start(%p.3), slice={{[0:64], [0:128]}}
  %slice-done.1 = bf16[64,128]{{1,0:T(8,128)(2,1)S(1)}} slice-done(%slice-start.1)
  %cc = bf16[64,128]{{1,0:T(8,128)(2,1)S(1)}} custom-call(%slice-done.1), custom_call_target="ConcatBitcast"
  %zero = s32[]{{:T(128)}} constant(0)
  %init = (s32[]{{:T(128)}}, bf16[64,256]{{1,0:T(8,128)(2,1)}}, bf16[64,32]{{1,0:T(8,128)(2,1)}}, s32[8,1]{{1,0:T(8,128)}}) tuple(%zero, %p.0, %p.1, %p.2)
  %loop = (s32[]{{:T(128)}}, bf16[64,256]{{1,0:T(8,128)(2,1)}}, bf16[64,32]{{1,0:T(8,128)(2,1)}}, s32[8,1]{{1,0:T(8,128)}}) while(%init), condition=%cond, body=%body, {_LAYER % "decoder/while"}
  %out = bf16[64,256]{{1,0:T(8,128)(2,1)}} get-tuple-element(%loop), index=1
  ROOT %fusion.3 = bf16[64,256]{{1,0:T(8,128)(2,1)}} fusion(%out), kind=kLoop, calls=%fused_computation.1, {_LAYER % "mlp/tanh"}, {_CYCLES % 1500}
}}
"""


def test_tiled_bytes_pad_the_minor_dimensions_to_the_tile():
  # 32 channels on 128 lanes: 4x the dense size.
  assert tpu_cost.tiled_bytes("bf16[5,8,32]{2,1,0:T(8,128)(2,1)}") == \
      5 * 8 * 128 * 2
  # The tile follows the layout's minor-to-major order, not the shape's:
  # here heads (dim 2, 8) are minor and padded to 128, x/y (dim 5) to 2.
  assert tpu_cost.tiled_bytes(
      "f32[5,1029,8,3,4,2]{2,5,4,1,0,3:T(2,128)}") == 4 * 5 * 1029 * 128 * 12 * 2
  # Sublanes too: 3 rows to 8. Tuples add up; no layout: dense.
  assert tpu_cost.tiled_bytes(
      "(f32[3,256]{1,0:T(8,128)}, bf16[10]{0:T(1024)})") == 8 * 256 * 4 + 2048
  assert tpu_cost.tiled_bytes("f32[3,5]") == 60


def test_trip_count_from_the_loop_condition():
  comps, entry = roofline.parse(HLO)
  loop = next(i for i in comps[entry] if i.opcode == "while")
  assert roofline._trip_count(comps, loop) == 4
  assert roofline._multipliers(comps, entry)["body"] == 4


def test_estimate_sums_cycles_times_trips_and_charges_the_rest_bytes():
  est = tpu_cost.estimate(HLO, "v5e")
  clock, hbm = tpu_cost.CLOCK_HZ["v5e"], tpu_cost.HBM_BPS["v5e"]
  # The gather: [64,32] table (lanes 32 -> 128) and [8,1] indices in, [8,32]
  # out, in tiled bytes, on each of 4 trips.
  gather = 64 * 128 * 2 + 8 * 128 * 4 + 8 * 128 * 2
  t = est["total"]
  assert t["xla_s"] == pytest.approx((4 * (3000 + 1) + 1500) / clock)
  assert t["unestimated_s"] == pytest.approx(4 * gather / hbm)
  assert t["s"] == pytest.approx(t["xla_s"] + t["unestimated_s"])
  # The async slice reads and writes its [64,128] destination beside the
  # compute: reported, not in the total. The custom call is a bitcast.
  assert t["async_s"] == pytest.approx(2 * 64 * 128 * 2 / hbm)
  assert t["kernels"] == 4 * 3 + 1
  groups = est["groups"]
  assert groups["head/decoder/layers"]["xla_s"] == pytest.approx(
      4 * 3000 / clock)
  assert groups["head/transformer/encoder"]["unestimated_s"] == \
      pytest.approx(4 * gather / hbm)
  assert list(groups)[0] == "head/decoder/layers"        # largest first
  assert "XLA:TPU cost model (v5e)" in tpu_cost.report(est)


def test_plan_takes_roofline_for_tpu_targets_not_local():
  from benchmarks import plan
  assert plan.parse_args(["--target", "v5e", "--roofline"]).roofline
  with pytest.raises(SystemExit):
    plan.parse_args(["--roofline"])
