"""Multi-scale deformable attention as one Pallas (Triton) kernel per pass.

Why: XLA's version ("taps" in deformable_attention.py) writes the 48 bilinear
tap rows and weights of every query to HBM ([M, 48] int32 + float32, M =
queries x heads) and reads them back for the gather; by the deviceless H100
roofline that traffic, not the gather, is ~75% of the encoder's MSDA time.
Here each program takes a block of queries of one frame and head, computes
the corners and weights in registers from the locations and attention
weights, gathers the value rows and accumulates in float32: the only HBM
traffic is the inputs once, the gathered rows (L2-resident: one frame's
table is 0.5 MB) and the output. The backward recomputes the corners,
scatters into the value gradient with float32 atomics (as XLA's scatter-add
does) and writes the location and weight gradients. Semantics are
`_corners`' exactly (grid_sample zeros, align_corners=False).

Triton GPUs only (NVIDIA; the Triton backend also targets ROCm). Tests run
the same kernels in Pallas' interpreter on CPU. jax 0.11 and 0.12 still
ship Pallas' Triton backend but warn that it is deprecated (Mosaic GPU is
its successor); "taps" stays the default.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

# Rows (query x head) per program. Powers of two (Triton); the backward
# holds more live values per row (the cotangent row as well).
FWD_BLOCK = 128
BWD_BLOCK = 64
NUM_WARPS = 4
# Pallas' interpreter instead of Triton (any backend): for tests on CPU,
# where `ms_deform_attn_core(impl="pallas")` has no other way to run.
INTERPRET = False


class _Geometry(NamedTuple):
  levels: tuple          # ((h, w), ...)
  starts: tuple          # first flat pixel of each level
  n: int                 # batch (frames)
  s: int                 # pixels of all levels
  lq: int                # queries
  nh: int                # heads
  npts: int              # points per level and head
  d: int                 # channels per head

  @property
  def rows(self):        # M: query x head rows
    return self.n * self.lq * self.nh


def _block_rows(geo: _Geometry, block: int):
  """This program's rows m [block] (one frame and head, `block` queries),
  clamped to the last query, and 1.0 where real; the frame and the head.

  One head per program: neighbouring queries sample overlapping
  neighbourhoods of the same head's table rows, so a block's gathers reuse
  cache lines. Clamping instead of masking: a dead lane recomputes the last
  query and stores the same values there (a benign duplicate); it only has
  to add nothing to the value gradient.
  """
  frame, head = pl.program_id(0) // geo.nh, pl.program_id(0) % geo.nh
  q = pl.program_id(1) * block + lax.broadcasted_iota(jnp.int32, (block,), 0)
  live = (q < geo.lq).astype(jnp.float32)
  m = (frame * geo.lq + jnp.minimum(q, geo.lq - 1)) * geo.nh + head
  return m, live, frame, head


def _taps(geo: _Geometry, m, frame, head, loc_ref, aw_ref):
  """Yields, per level and point, (j, attention [block], corners), corners
  being 4 (table row [block], bilinear weight with validity [block], dwx,
  dwy) where dwx/dwy are d weight / d(fx, fy) (for the backward)."""
  for lvl, ((h, w), start) in enumerate(zip(geo.levels, geo.starts)):
    base = (frame * geo.s + start) * geo.nh + head
    for p in range(geo.npts):
      j = lvl * geo.npts + p
      x = loc_ref[m, 2 * j] * w - 0.5          # grid_sample, align_corners=0
      y = loc_ref[m, 2 * j + 1] * h - 0.5
      a = aw_ref[m, j]
      x0, y0 = jnp.floor(x), jnp.floor(y)
      fx, fy = x - x0, y - y0
      corners = []
      for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        cx, cy = x0 + dx, y0 + dy
        valid = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
        wx = fx if dx else 1.0 - fx
        wy = fy if dy else 1.0 - fy
        # Clamped again as integers: a NaN location (a diverging run) has
        # no defined int conversion and must not address outside the table.
        ix = jnp.clip(jnp.clip(cx, 0, w - 1).astype(jnp.int32), 0, w - 1)
        iy = jnp.clip(jnp.clip(cy, 0, h - 1).astype(jnp.int32), 0, h - 1)
        pix = iy * w + ix
        vf = valid.astype(jnp.float32)
        corners.append((base + pix * geo.nh, wx * wy * vf,
                        (2 * dx - 1) * wy * vf, (2 * dy - 1) * wx * vf))
      yield j, a, corners


def _fwd_kernel(tab_ref, loc_ref, aw_ref, out_ref, *, geo, block):
  m, _, frame, head = _block_rows(geo, block)
  acc = jnp.zeros((block, geo.d), jnp.float32)
  for _, a, corners in _taps(geo, m, frame, head, loc_ref, aw_ref):
    for row, bil, _, _ in corners:
      acc += tab_ref[row, :].astype(jnp.float32) * (bil * a)[:, None]
  out_ref[m, :] = acc.astype(out_ref.dtype)


def _bwd_kernel(tab_ref, loc_ref, aw_ref, ct_ref, _, dtab_ref, dloc_ref,
                daw_ref, *, geo, block, masked):
  m, live, frame, head = _block_rows(geo, block)
  ct = ct_ref[m, :].astype(jnp.float32)                      # [block, D]
  cols = lax.broadcasted_iota(jnp.int32, (block, geo.d), 1)
  for j, a, corners in _taps(geo, m, frame, head, loc_ref, aw_ref):
    d_a = d_fx = d_fy = 0.0
    for row, bil, dwx, dwy in corners:
      g = tab_ref[row, :].astype(jnp.float32)
      dw = jnp.sum(g * ct, axis=1)                     # d out . d w [block]
      rows = jnp.broadcast_to(row[:, None], (block, geo.d))
      upd = (bil * a * live)[:, None] * ct
      # Pallas' interpreter takes no atomic mask; there the update is 0.
      mask = (jnp.broadcast_to(((bil * live) != 0)[:, None], (block, geo.d))
              if masked else None)
      pltriton.atomic_add(dtab_ref, (rows, cols), upd, mask=mask)
      d_a += bil * dw
      d_fx += dwx * a * dw
      d_fy += dwy * a * dw
    lvl = j // geo.npts
    h, w = geo.levels[lvl]
    dloc_ref[m, 2 * j] = d_fx * w
    dloc_ref[m, 2 * j + 1] = d_fy * h
    daw_ref[m, j] = d_a


def _call(kernel, geo, block, out_shape, interpret, name, **kw):
  return pl.pallas_call(
      functools.partial(kernel, geo=geo, block=block, **kw),
      out_shape=out_shape,
      grid=(geo.n * geo.nh, pl.cdiv(geo.lq, block)),
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS,
                                              num_stages=1),
      interpret=interpret, name=name,
      **({"input_output_aliases": {4: 0}} if name.endswith("bwd") else {}))


def _flat(value, loc, aw):
  n, s, nh, d = value.shape
  _, lq, _, nl, npts, _ = loc.shape
  return (value.reshape(n * s * nh, d),
          loc.astype(jnp.float32).reshape(n * lq * nh, nl * npts * 2),
          aw.astype(jnp.float32).reshape(n * lq * nh, nl * npts))


def _forward(geo, interpret, fwd_block, value, loc, aw):
  table, loc2, aw2 = _flat(value, loc, aw)
  out = _call(_fwd_kernel, geo, fwd_block,
              jax.ShapeDtypeStruct((geo.rows, geo.d), value.dtype),
              interpret, "msda_fwd")(table, loc2, aw2)
  return out.reshape(geo.n, geo.lq, geo.nh * geo.d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _msda(geo, interpret, fwd_block, bwd_block, value, loc, aw):
  return _forward(geo, interpret, fwd_block, value, loc, aw)


def _msda_fwd(geo, interpret, fwd_block, bwd_block, value, loc, aw):
  return (_forward(geo, interpret, fwd_block, value, loc, aw),
          (value, loc, aw))


def _msda_bwd(geo, interpret, fwd_block, bwd_block, res, ct):
  value, loc, aw = res
  table, loc2, aw2 = _flat(value, loc, aw)
  f32 = jnp.float32
  d_table, d_loc, d_aw = _call(
      _bwd_kernel, geo, bwd_block,
      (jax.ShapeDtypeStruct(table.shape, f32),
       jax.ShapeDtypeStruct(loc2.shape, f32),
       jax.ShapeDtypeStruct(aw2.shape, f32)),
      interpret, "msda_bwd", masked=not interpret)(
          table, loc2, aw2, ct.reshape(geo.rows, geo.d),
          jnp.zeros(table.shape, f32))
  return (d_table.astype(value.dtype).reshape(value.shape),
          d_loc.reshape(loc.shape).astype(loc.dtype),
          d_aw.reshape(aw.shape).astype(aw.dtype))


_msda.defvjp(_msda_fwd, _msda_bwd)


def ms_deform_attn_pallas(value, spatial_shapes: Sequence[tuple[int, int]],
                          sampling_locations, attention_weights, *,
                          interpret: bool | None = None,
                          fwd_block: int = FWD_BLOCK,
                          bwd_block: int | None = None):
  """`deformable_attention.ms_deform_attn_core` with impl="pallas": same
  arguments and result [B, Lq, nH*D]; differentiable in all three arrays.
  `interpret` (default: INTERPRET) runs the kernels in Pallas' interpreter
  (any backend: tests). The interpreter's atomic add keeps one of a block's
  updates to the same row, so there the backward takes one row per program
  unless `bwd_block` says otherwise."""
  if interpret is None:
    interpret = INTERPRET
  if bwd_block is None:
    bwd_block = 1 if interpret else BWD_BLOCK
  n, s, nh, d = value.shape
  _, lq, _, nl, npts, _ = sampling_locations.shape
  if d & (d - 1) or not all(b & (b - 1) == 0 for b in (fwd_block, bwd_block)):
    raise ValueError(f"MSDA impl 'pallas' needs power-of-two head channels "
                     f"and blocks (Triton), got {d} channels per head and "
                     f"blocks {fwd_block}, {bwd_block}")
  levels = tuple((int(h), int(w)) for h, w in spatial_shapes)
  if len(levels) != nl or sum(h * w for h, w in levels) != s:
    raise ValueError(f"MSDA: spatial shapes {levels} do not match value's "
                     f"{s} pixels and the locations' {nl} levels")
  starts, acc = [], 0
  for h, w in levels:
    starts.append(acc)
    acc += h * w
  geo = _Geometry(levels, tuple(starts), n, s, lq, nh, npts, d)
  return _msda(geo, interpret, fwd_block, bwd_block, value,
               sampling_locations, attention_weights)
