"""Transformer encoder (paper Sec. "Transformer Encoder").

Six post-norm layers of multi-scale deformable self-attention over the
stride 8/16/32 features (1029 tokens at 224, 5376 at 512), each followed by a
256-2048-256 GELU FFN. Its level-0 output becomes the mask feature.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from avsegformer_jax import layers
from avsegformer_jax.deformable_attention import DEFAULT_IMPL, MSDeformAttn


def sine_position_encoding(h: int, w: int, num_feats: int = 128,
                           temperature: float = 10000.0) -> np.ndarray:
  """DETR's sine encoding with normalize=False: raw positions 1..H, 1..W.

  Returns [h*w, 2*num_feats] laid out as [y (sin, cos interleaved), x (...)].
  Static shapes, so it is computed once in numpy (float32 like the original).
  """
  y = np.arange(1, h + 1, dtype=np.float32)[:, None] * np.ones((1, w), np.float32)
  x = np.ones((h, 1), np.float32) * np.arange(1, w + 1, dtype=np.float32)[None]
  i = np.arange(num_feats, dtype=np.float32)
  dim_t = (temperature ** (2 * (i // 2) / num_feats)).astype(np.float32)
  def enc(p):
    p = p[..., None] / dim_t                                       # [h,w,F]
    return np.stack([np.sin(p[..., 0::2]), np.cos(p[..., 1::2])],
                    axis=-1).reshape(h, w, num_feats)
  return np.concatenate([enc(y), enc(x)], -1).reshape(h * w, 2 * num_feats)


def reference_points(spatial_shapes: Sequence[tuple[int, int]]) -> np.ndarray:
  """Pixel centres ((x+.5)/W, (y+.5)/H) of every level's tokens: [S, 2]."""
  pts = []
  for h, w in spatial_shapes:
    ry, rx = np.meshgrid(np.linspace(0.5, h - 0.5, h, dtype=np.float32),
                         np.linspace(0.5, w - 0.5, w, dtype=np.float32),
                         indexing="ij")
    pts.append(np.stack([rx.reshape(-1) / w, ry.reshape(-1) / h], -1))
  return np.concatenate(pts, 0).astype(np.float32)


class EncoderLayer(nn.Module):
  dim: int = 256
  ffn_dim: int = 2048
  dropout: float = 0.1
  num_levels: int = 3
  num_heads: int = 8
  num_points: int = 4
  spatial_shapes: tuple = ()
  train: bool = False
  scan: bool = False             # return (x, None) for nn.scan
  msda_impl: str = DEFAULT_IMPL
  dtype: jnp.dtype = jnp.float32
  dropout_impl: str = "bernoulli"   # dropout.DROPOUT_IMPLS

  @nn.compact
  def __call__(self, src, pos, ref):
    drop = lambda x: layers.Dropout(self.dropout, deterministic=not self.train,
                                    impl=self.dropout_impl)(x)
    attn = MSDeformAttn(self.dim, self.num_levels, self.num_heads,
                        self.num_points, impl=self.msda_impl,
                        dtype=self.dtype, name="self_attn")
    src = src + drop(attn(src + pos, ref, src, self.spatial_shapes))
    src = layers.layer_norm(dtype=self.dtype, name="norm1")(src)
    y = layers.dense(self.ffn_dim, dtype=self.dtype, name="linear1")(src)
    y = layers.dense(self.dim, dtype=self.dtype, name="linear2")(
        drop(layers.gelu(y)))
    src = layers.layer_norm(dtype=self.dtype, name="norm2")(src + drop(y))
    return (src, None) if self.scan else src


class Encoder(nn.Module):
  """src [B,S,C], pos [S,C] or [B,S,C] -> memory [B,S,C]."""
  num_layers: int = 6
  dim: int = 256
  ffn_dim: int = 2048
  dropout: float = 0.1
  num_levels: int = 3
  num_heads: int = 8
  num_points: int = 4
  spatial_shapes: tuple = ()
  remat: bool | str = False         # layers.remat_module
  scan_layers: bool = False
  msda_impl: str = DEFAULT_IMPL
  dtype: jnp.dtype = jnp.float32
  dropout_impl: str = "bernoulli"

  @nn.compact
  def __call__(self, src, pos, train: bool = False):
    b = src.shape[0]
    ref = jnp.asarray(reference_points(self.spatial_shapes))
    # valid ratios are 1 (no padding), so every level shares the same points.
    ref = jnp.broadcast_to(ref[None, :, None, :],
                           (b, ref.shape[0], self.num_levels, 2))
    kwargs = dict(dim=self.dim, ffn_dim=self.ffn_dim, dropout=self.dropout,
                  num_levels=self.num_levels, num_heads=self.num_heads,
                  num_points=self.num_points,
                  spatial_shapes=self.spatial_shapes, train=train,
                  msda_impl=self.msda_impl, dtype=self.dtype,
                  dropout_impl=self.dropout_impl)
    return layers.repeat(EncoderLayer, self.num_layers, kwargs, src, pos, ref,
                         remat=self.remat, scan=self.scan_layers)
