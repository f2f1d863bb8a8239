"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2020), pure JAX.

AVSegFormer's encoder (paper Sec. "Transformer Encoder") uses it over the
stride 8/16/32 features. No custom kernel: bilinear sampling is written as
gathers so it compiles everywhere (CPU, GPU, TPU) and differentiates.

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

from avsegformer_jax import layers


def _sample_level(value, h, w, loc):
  """Bilinear samples of one level.

  value: [B, nH, h*w, D]; loc: [B, nH, P, 2] (x, y) in [0, 1] coordinates.
  Returns [B, nH, P, D]; samples outside the map are zero (grid_sample zeros).
  """
  x = loc[..., 0] * w - 0.5
  y = loc[..., 1] * h - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  fx, fy = x - x0, y - y0
  out = None
  for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
    xi, yi = x0 + dx, y0 + dy
    wgt = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
    valid = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
    idx = (jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)).astype(jnp.int32)
    g = jnp.take_along_axis(value, idx[..., None], axis=2)
    term = g * jnp.where(valid, wgt, 0.0)[..., None].astype(value.dtype)
    out = term if out is None else out + term
  return out


def _sample_level_fused(value, h, w, loc):
  """As `_sample_level`, with the four corners packed into one gather."""
  x = loc[..., 0] * w - 0.5
  y = loc[..., 1] * h - 0.5
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  xs = jnp.stack([x0, x0 + 1, x0, x0 + 1], -1)                    # [..., P, 4]
  ys = jnp.stack([y0, y0, y0 + 1, y0 + 1], -1)
  wx = jnp.stack([1 - fx, fx, 1 - fx, fx], -1)
  wy = jnp.stack([1 - fy, 1 - fy, fy, fy], -1)
  valid = (xs >= 0) & (xs <= w - 1) & (ys >= 0) & (ys <= h - 1)
  wgt = jnp.where(valid, wx * wy, 0.0).astype(value.dtype)
  idx = (jnp.clip(ys, 0, h - 1) * w + jnp.clip(xs, 0, w - 1)).astype(jnp.int32)
  b, nh, p = idx.shape[:3]
  g = jnp.take_along_axis(value, idx.reshape(b, nh, p * 4, 1), axis=2)
  return jnp.einsum("bhpcd,bhpc->bhpd", g.reshape(b, nh, p, 4, -1), wgt)


SAMPLERS = {"gather4": _sample_level, "fused": _sample_level_fused}


def ms_deform_attn_core(value, spatial_shapes: Sequence[tuple[int, int]],
                        sampling_locations, attention_weights,
                        impl: str = "gather4"):
  """The sampling core.

  value: [B, S, nH, D] (S = sum of h*w); sampling_locations:
  [B, Lq, nH, nL, nP, 2] (x, y); attention_weights: [B, Lq, nH, nL, nP].
  Returns [B, Lq, nH*D] with channel = head * D + d.
  """
  b, _, nh, d = value.shape
  _, lq, _, nl, npts, _ = sampling_locations.shape
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
  impl: str = "gather4"          # bilinear sampler: gather4 | fused
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
                       name="sampling_offsets")(query)
    offsets = offsets.reshape(b, lq, nh, nl, npts, 2).astype(jnp.float32)
    logits = nn.Dense(nh * nl * npts, dtype=self.dtype, kernel_init=zeros,
                      name="attention_weights")(query)
    attn = jax.nn.softmax(logits.reshape(b, lq, nh, nl * npts)
                          .astype(jnp.float32), axis=-1)
    attn = attn.reshape(b, lq, nh, nl, npts)
    normalizer = jnp.asarray([[w, h] for h, w in spatial_shapes], jnp.float32)
    locations = (reference_points[:, :, None, :, None, :].astype(jnp.float32)
                 + offsets / normalizer[None, None, None, :, None, :])
    self.sow("intermediates", "sampling_locations", locations)
    self.sow("intermediates", "attention_probs", attn)
    out = ms_deform_attn_core(value, spatial_shapes, locations.astype(value.dtype),
                              attn.astype(value.dtype), self.impl)
    return layers.dense(self.d_model, dtype=self.dtype, name="output_proj")(out)
