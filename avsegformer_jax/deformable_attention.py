"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2020), pure JAX.

AVSegFormer's encoder (paper Sec. "Transformer Encoder") uses it over the
stride 8/16/32 features. Bilinear sampling is written as gathers, or (for
TPU, where gathers are slow) as dense interpolation matrices on the MXU, so
it compiles everywhere (CPU, GPU, TPU) and differentiates; a Triton kernel
is an option on GPUs.

Semantics of the original (`ms_deform_attn_core_pytorch`): grid_sample with
zero padding and align_corners=False, i.e. pixel = location * size - 0.5;
attention softmax jointly over levels x points per head.
"""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from avsegformer_jax import dots, layers


# Corner c of a bilinear tap is (x0 + _DX[c], y0 + _DY[c]).
_DX = np.asarray([0, 1, 0, 1], np.float32)
_DY = np.asarray([0, 0, 1, 1], np.float32)


def _corners(loc, h, w):
  """Bilinear corners of sampling locations (always computed in float32).

  loc [..., 2] (x, y) in [0, 1] -> flat indices [..., 4] (clamped) and
  weights [..., 4], zero for corners outside the map (grid_sample zeros,
  align_corners=False: pixel = location * size - 0.5). h, w: ints, or arrays
  that broadcast against loc[..., 0] (per-level sizes).

  On CPU the two results are made in their own loop (`layers.cpu_fence`):
  XLA:CPU otherwise merges the corner arithmetic into each consumer (the
  table rows, the weights times attention) and recomputes it there, or
  with the four corners stacked, writes them out along a 4-wide minor axis
  (the encoder's [5, 1029, 8, 3, 4] locations, rows and weights: 10.3-12.2
  -> 3.7-4.1 ms, the same values).
  """
  def corners(loc):
    return _corners_math(loc, h, w)
  return jax.lax.platform_dependent(
      loc, cpu=lambda l: layers.cpu_fence(corners, l), default=corners)


def _corners_math(loc, h, w):
  loc = loc.astype(jnp.float32)
  h4 = np.asarray(h, np.float32)[..., None]          # broadcast over corners
  w4 = np.asarray(w, np.float32)[..., None]
  x = loc[..., 0] * w - 0.5
  y = loc[..., 1] * h - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = (x - x0)[..., None], (y - y0)[..., None]
  xs, ys = x0[..., None] + _DX, y0[..., None] + _DY
  wx = jnp.where(_DX > 0, fx, 1 - fx)
  wy = jnp.where(_DY > 0, fy, 1 - fy)
  valid = (xs >= 0) & (xs <= w4 - 1) & (ys >= 0) & (ys <= h4 - 1)
  wgt = jnp.where(valid, wx * wy, 0.0)
  idx = (jnp.clip(ys, 0, h4 - 1) * w4 + jnp.clip(xs, 0, w4 - 1))
  return idx.astype(jnp.int32), wgt


def _sample_level(value, h, w, loc):
  """Bilinear samples of one level, one gather per corner.

  value: [B, nH, h*w, D]; loc: [B, nH, P, 2] (x, y) in [0, 1] coordinates.
  Returns [B, nH, P, D]; samples outside the map are zero (grid_sample zeros).
  """
  idx, wgt = _corners(loc, h, w)                                  # [B,nH,P,4]
  out = None
  for c in range(4):
    g = jnp.take_along_axis(value, idx[..., c, None], axis=2)
    term = g * wgt[..., c, None].astype(value.dtype)
    out = term if out is None else out + term
  return out


def _sample_level_fused(value, h, w, loc):
  """As `_sample_level`, with the four corners packed into one gather."""
  idx, wgt = _corners(loc, h, w)
  b, nh, p = idx.shape[:3]
  g = jnp.take_along_axis(value, idx.reshape(b, nh, p * 4, 1), axis=2)
  return jnp.einsum("bhpcd,bhpc->bhpd", g.reshape(b, nh, p, 4, -1),
                    wgt.astype(value.dtype))


SAMPLERS = {"gather4": _sample_level, "fused": _sample_level_fused}


def _tent(x, cols):
  """Bilinear weights of pixel coordinates x [...] over pixel columns `cols`
  [K] -> [..., K] float32: 1 - frac at floor(x), frac at floor(x) + 1, zero
  elsewhere, as `_corners` (columns outside the map do not exist: zero
  padding). Written with floor, not as max(0, 1 - |x - col|), so that the
  gradient at integer x (the encoder's locations at init: pixel centres) is
  grid_sample's: -1 on floor(x), +1 on the next column."""
  x0 = jnp.floor(x)
  f = (x - x0)[..., None]
  d = np.asarray(cols, np.float32) - x0[..., None]
  return jnp.where(d == 0, 1 - f, jnp.where(d == 1, f, 0.0))


def _dense_core(value, spatial_shapes, sampling_locations, attention_weights):
  """Every level's taps as one dense [Lq, h*w] matrix per head, times value.

  Entry (q, s) is sum over points of attention x bilinear weight of pixel s,
  made elementwise from the pixel's coordinates (`_tent`), so the sampling
  is MXU matmuls with no gather and no scatter in the backward. Its work is
  O(Lq * S) per head against the gathers' O(Lq * points): on TPU, by XLA's
  cost model, 4.6x faster than "gather4" forward+backward at 224 (Lq = S =
  1029) and 4x slower at 512 (5376), hence `_auto_tpu`.
  """
  out, start = None, 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    v = value[:, start:start + h * w]                             # [B,hw,nH,D]
    start += h * w
    loc = sampling_locations[:, :, :, lvl].astype(jnp.float32)
    loc = loc.transpose(0, 2, 1, 3, 4)                            # [B,nH,Lq,nP,2]
    pix = np.arange(h * w)
    kx = _tent(loc[..., 0] * w - 0.5, pix % w)                    # [B,nH,Lq,nP,hw]
    ky = _tent(loc[..., 1] * h - 0.5, pix // w)
    aw = attention_weights[:, :, :, lvl].astype(jnp.float32)
    aw = aw.transpose(0, 2, 1, 3)                                 # [B,nH,Lq,nP]
    m = jnp.sum(aw[..., None] * kx * ky, axis=3).astype(value.dtype)
    term = jnp.einsum("bhqs,bshd->bqhd", m, v,
                      preferred_element_type=jnp.float32)
    out = term if out is None else out + term
  return out.astype(value.dtype)                                  # [B,Lq,nH,D]


# Above this many (query, pixel) pairs per head, "dense" does more work on TPU
# than "gather4" saves (XLA:TPU's cost model, v5e: benchmarks/README.md).
DENSE_MAX_PAIRS = 4_500_000


def _dense_grouped(value, spatial_shapes, sampling_locations,
                   attention_weights):
  """`_dense_core` whose backward takes the frames in groups of at most
  DENSE_MAX_PAIRS (query, pixel) pairs, one group after another (`lax.map`).

  XLA:TPU splits the backward's reductions over [B, nH, Lq, nP, hw] into
  more kernels the more frames there are, each rebuilding the tents (v5e,
  224, forward+backward: 0.62 ms a frame up to 4 frames, 1.84 at 40; in
  groups of 4, 0.62). Autodiff of a map would stack every group's tents
  for the backward (26.8 GB at 40 frames); here each group's are rebuilt.

  Remat keeps the output (REMAT_KEEP), else a rematerialised layer builds
  the tents three times (v5e AVSS step: 926 -> 835 ms). The name is not on
  the branch's output: there remat would keep the output of every
  platform's branch, and XLA:GPU then writes `taps`' gathers out (+9%).
  """
  def core(v, loc, aw):
    return _dense_core(v, spatial_shapes, loc, aw)
  b, lq = sampling_locations.shape[:2]
  kept = lambda out: checkpoint_name(out, layers.REMAT_KEEP).reshape(b, lq, -1)
  most = max(1, DENSE_MAX_PAIRS // (lq * sum(h * w for h, w in spatial_shapes)))
  group = max(k for k in range(1, min(b, most) + 1) if b % k == 0)
  if group == b:
    return kept(core(value, sampling_locations, attention_weights))

  def backward(inputs, g):
    def one(args):
      *primals, cotangent = args
      return jax.vjp(core, *primals)[1](cotangent)
    split = lambda x: x.reshape((b // group, group) + x.shape[1:])
    grads = jax.lax.map(one, tuple(map(split, inputs + (g,))))
    return tuple(x.reshape((b,) + x.shape[2:]) for x in grads)

  grouped = jax.custom_vjp(core)
  grouped.defvjp(lambda *a: (core(*a), a), backward)
  return kept(grouped(value, sampling_locations, attention_weights))


def _auto_tpu(lq, spatial_shapes) -> str:
  s = sum(h * w for h, w in spatial_shapes)
  return "dense" if lq * s <= DENSE_MAX_PAIRS else "gather4"


# Core implementations: per level with the samplers above, or all levels at
# once from value viewed as a [B*S*nH, D] table with the bilinear and
# attention weights folded together ("rows": one gather + weighted sum;
# "taps": gathers fused into the sum, custom backward). benchmarks/msda.py
# times them; "taps" is the fastest on CPU (forward 4x "rows") and GPU
# (bf16 forward+backward 9x "gather4"). On TPU the 48-tap table gathers are
# the worst: XLA:TPU materialises [M, 48, 32] padded to 128 lanes and takes
# minutes to compile them (benchmarks/README.md). "dense" (`_dense_core`,
# backward in groups of frames: `_dense_grouped`): the taps as dense
# matrices times value, no gathers. So "auto", the default, is "taps" on CPU
# and GPU and, on TPU, "dense" up to DENSE_MAX_PAIRS (224: yes, 512: no),
# then "gather4"; chosen when the step is lowered. "pallas"
# (deformable_attention_pallas.py): one Triton kernel per pass that never
# writes the taps to HBM; GPUs only, opt-in.
IMPLS = ("auto", "gather4", "fused", "rows", "taps", "pallas", "dense")
DEFAULT_IMPL = "auto"
AUTO = {"tpu": _auto_tpu, "default": "taps"}


def _table_rows(value, spatial_shapes, sampling_locations, attention_weights):
  """All levels' bilinear taps as rows of value viewed as a [B*S*nH, D] table
  (its natural layout: no transpose, no batch dimensions in the gather).

  Returns the table, rows [B*Lq*nH, K] (in bounds) and float32 weights
  [B*Lq*nH, K] = bilinear x attention, K = nL * nP * 4 taps.
  """
  b, s, nh, d = value.shape
  _, lq, _, nl, _, _ = sampling_locations.shape
  hs = np.asarray([h for h, _ in spatial_shapes], np.float32).reshape(nl, 1)
  ws = np.asarray([w for _, w in spatial_shapes], np.float32).reshape(nl, 1)
  starts = np.cumsum([0] + [h * w for h, w in spatial_shapes])[:-1]
  idx, wgt = _corners(sampling_locations, hs, ws)        # [B,Lq,nH,nL,nP,4]
  row = (idx + starts.reshape(nl, 1, 1).astype(np.int32)) * nh
  row = row + (np.arange(b, dtype=np.int32) * (s * nh)).reshape(b, 1, 1, 1, 1, 1)
  row = row + np.arange(nh, dtype=np.int32).reshape(1, 1, nh, 1, 1, 1)
  wgt = wgt * attention_weights.astype(jnp.float32)[..., None]
  return (value.reshape(b * s * nh, d), row.reshape(b * lq * nh, -1),
          wgt.reshape(b * lq * nh, -1))


def _gather(table, rows):
  return table.at[rows].get(mode="promise_in_bounds")


def _gather_taps(table, row):
  """table [R, D], row [M, K] -> every tap at once, float32 [M, K, D]."""
  g = _gather(table, row.reshape(-1)).reshape(row.shape + table.shape[-1:])
  return g.astype(jnp.float32)


def _weighted_rows_plain(table, row, wgt):
  """One gather of every tap [M, K, D], then the weighted sum (float32)."""
  return jnp.einsum("mkd,mk->md", _gather_taps(table, row), wgt)


@jax.custom_vjp
def _weighted_rows(table, row, wgt):
  """sum_k wgt[m, k] * table[row[m, k]]: table [R, D], row/wgt [M, K] -> [M, D]
  in table's dtype (summed in float32).

  One gather per tap, multiplied and added in turn, so XLA fuses the
  gathers and the sum into one loop and never writes the [M, K, D]
  intermediate: the gather is memory-bound on CPU. The custom backward keeps
  one scatter-add for the table (autodiff of the loop would give K of them)
  and fused gather-dot loops for the weights.
  """
  def plain(t, r, w):
    return _weighted_rows_plain(t, r, w).astype(t.dtype)
  return jax.lax.platform_dependent(table, row, wgt, cpu=_fenced_tap_loop,
                                    default=plain)


def _tap_loop(table, row, wgt):
  out = None
  for k in range(row.shape[-1]):
    term = _gather(table, row[:, k]).astype(jnp.float32) * wgt[:, k, None]
    out = term if out is None else out + term
  return out.astype(table.dtype)


def _fenced_tap_loop(table, row, wgt):
  """`_tap_loop` as the one branch of a conditional, on CPU.

  Left at top level, XLA:CPU fuses the consumer's reshape ([B*Lq*nH, D] ->
  [B*Lq, nH*D], for `output_proj`) into the loop and emits it over rows of
  nH*D elements whose gather index changes every D: no longer vectorised,
  4x slower (encoder layer, 5 frames at 224: 9.5 -> 42 ms with the
  projection); `layers.cpu_fence` keeps them apart.
  """
  return layers.cpu_fence(_tap_loop, table, row, wgt)


def _tap_dots_loop(table, row, ct):
  return jnp.stack([
      jnp.sum(_gather(table, row[:, k]).astype(jnp.float32) * ct, -1)
      for k in range(row.shape[-1])], -1)


def _tap_dots_gather(table, row, ct):
  return jnp.einsum("mkd,md->mk", _gather_taps(table, row), ct)


def _weighted_rows_fwd(table, row, wgt):
  return _weighted_rows(table, row, wgt), (table, row, wgt)


def _weighted_rows_bwd(res, ct):
  table, row, wgt = res
  # The backward gathers what the forward gathered: XLA would merge the two
  # (CSE), and the forward's taps, then written out to serve both, would no
  # longer fuse into its loop (CPU, one S4 frame, forward + backward: 67 -> 46
  # ms in bfloat16, 44 -> 35 ms in float32). The barrier keeps them apart.
  table, row = jax.lax.optimization_barrier((table, row))
  ct = ct.astype(jnp.float32)
  d_wgt = jax.lax.platform_dependent(table, row, ct, cpu=_tap_dots_loop,
                                     default=_tap_dots_gather)
  upd = (wgt[:, :, None] * ct[:, None, :]).reshape(-1, table.shape[-1])
  d_table = jnp.zeros(table.shape, jnp.float32).at[row.reshape(-1)].add(
      upd, mode="promise_in_bounds")
  return d_table.astype(table.dtype), None, d_wgt


_weighted_rows.defvjp(_weighted_rows_fwd, _weighted_rows_bwd)


def ms_deform_attn_core(value, spatial_shapes: Sequence[tuple[int, int]],
                        sampling_locations, attention_weights,
                        impl: str = DEFAULT_IMPL):
  """The sampling core.

  value: [B, S, nH, D] (S = sum of h*w); sampling_locations:
  [B, Lq, nH, nL, nP, 2] (x, y); attention_weights: [B, Lq, nH, nL, nP].
  Returns [B, Lq, nH*D] with channel = head * D + d. Locations stay float32
  whatever the compute dtype: in bfloat16 they would be off by up to a
  quarter pixel on a 64-wide map.
  """
  if impl == "auto":
    lq = sampling_locations.shape[1]
    def core(name):
      name = name if isinstance(name, str) else name(lq, spatial_shapes)
      return lambda v, loc, aw: ms_deform_attn_core(v, spatial_shapes, loc,
                                                    aw, name)
    return jax.lax.platform_dependent(
        value, sampling_locations, attention_weights,
        **{k: core(v) for k, v in AUTO.items()})
  if impl == "pallas":
    from avsegformer_jax import deformable_attention_pallas as pallas
    return pallas.ms_deform_attn_pallas(value, spatial_shapes,
                                        sampling_locations, attention_weights)
  b, _, nh, d = value.shape
  _, lq, _, nl, npts, _ = sampling_locations.shape
  if impl == "dense":
    return _dense_grouped(value, spatial_shapes, sampling_locations,
                          attention_weights)
  if impl in ("rows", "taps"):
    table, row, wgt = _table_rows(value, spatial_shapes, sampling_locations,
                                  attention_weights)
    fn = _weighted_rows if impl == "taps" else _weighted_rows_plain
    return fn(table, row, wgt).astype(value.dtype).reshape(b, lq, nh * d)
  if impl not in SAMPLERS:
    raise ValueError(f"MSDA impl must be one of {IMPLS}, got {impl!r}")
  out = None
  start = 0
  for lvl, (h, w) in enumerate(spatial_shapes):
    v = value[:, start:start + h * w].transpose(0, 2, 1, 3)       # [B,nH,hw,D]
    start += h * w
    loc = sampling_locations[:, :, :, lvl].transpose(0, 2, 1, 3, 4)
    loc = loc.reshape(b, nh, lq * npts, 2)
    s = SAMPLERS[impl](v, h, w, loc).reshape(b, nh, lq, npts, d)
    aw = attention_weights[:, :, :, lvl].transpose(0, 2, 1, 3)     # [B,nH,Lq,nP]
    term = jnp.einsum("bhqpd,bhqp->bqhd", s, aw.astype(s.dtype))
    out = term if out is None else out + term
  return out.reshape(b, lq, nh * d)


def _offset_bias_init(n_heads, n_levels, n_points):
  """Deformable DETR's init: each head looks in its own direction, point i at
  distance i+1, so training starts from a sensible sampling pattern."""
  def init(key, shape, dtype=jnp.float32):
    del key
    theta = np.arange(n_heads, dtype=np.float64) * (2.0 * math.pi / n_heads)
    grid = np.stack([np.cos(theta), np.sin(theta)], -1)
    grid = grid / np.abs(grid).max(-1, keepdims=True)
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))
    grid *= np.arange(1, n_points + 1)[None, None, :, None]
    return jnp.asarray(grid.reshape(shape), dtype)
  return init


class MSDeformAttn(nn.Module):
  """MSDeformAttn(d_model, n_levels, n_heads, n_points) of Deformable DETR."""
  d_model: int = 256
  n_levels: int = 3
  n_heads: int = 8
  n_points: int = 4
  impl: str = DEFAULT_IMPL       # core: one of IMPLS
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, reference_points, input_flatten,
               spatial_shapes: Sequence[tuple[int, int]]):
    """query [B,Lq,C], reference_points [B,Lq,nL,2] (x,y in [0,1]),
    input_flatten [B,S,C] -> [B,Lq,C]."""
    nh, nl, npts = self.n_heads, self.n_levels, self.n_points
    b, lq, _ = query.shape
    zeros = nn.initializers.zeros
    value = layers.dense(self.d_model, dtype=self.dtype, name="value_proj")(
        input_flatten)
    value = value.reshape(b, -1, nh, self.d_model // nh)
    offsets = nn.Dense(nh * nl * npts * 2, dtype=self.dtype, kernel_init=zeros,
                       bias_init=_offset_bias_init(nh, nl, npts),
                       dot_general=dots.dot_general,
                       name="sampling_offsets")(query)
    offsets = offsets.reshape(b, lq, nh, nl, npts, 2).astype(jnp.float32)
    logits = nn.Dense(nh * nl * npts, dtype=self.dtype, kernel_init=zeros,
                      dot_general=dots.dot_general,
                      name="attention_weights")(query)
    attn = jax.nn.softmax(logits.reshape(b, lq, nh, nl * npts)
                          .astype(jnp.float32), axis=-1)
    attn = attn.reshape(b, lq, nh, nl, npts)
    normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)
    locations = (reference_points[:, :, None, :, None, :].astype(jnp.float32)
                 + offsets / normalizer[None, None, None, :, None, :])
    self.sow("intermediates", "sampling_locations", locations)
    self.sow("intermediates", "attention_probs", attn)
    out = ms_deform_attn_core(value, spatial_shapes, locations, attn,
                              self.impl)
    return layers.dense(self.d_model, dtype=self.dtype, name="output_proj")(out)
