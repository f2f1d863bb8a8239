"""PVTv2 (Wang et al. 2022), AVSegFormer's transformer backbone; B0-B5.

Overlapping patch embeddings (7x7/s4 then 3x3/s2 convs + LayerNorm eps 1e-5),
blocks of spatial-reduction attention (kernel = stride = sr conv + LayerNorm
eps 1e-5 on keys/values) and a MLP with a depthwise 3x3 conv between its FCs,
block and stage norms eps 1e-6, stochastic depth rising linearly to
`drop_path_rate` over all blocks. Outputs the four stage maps (strides
4/8/16/32). The paper uses B5 (40 blocks in stage 3); smaller variants let
small machines train.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from avsegformer_jax import attention, dots, layers

_B1_B4 = dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(8, 8, 4, 4))
VARIANTS = {
    "b0": dict(embed_dims=(32, 64, 160, 256), mlp_ratios=(8, 8, 4, 4),
               depths=(2, 2, 2, 2)),
    "b1": dict(_B1_B4, depths=(2, 2, 2, 2)),
    "b2": dict(_B1_B4, depths=(3, 4, 6, 3)),
    "b3": dict(_B1_B4, depths=(3, 4, 18, 3)),
    "b4": dict(_B1_B4, depths=(3, 8, 27, 3)),
    "b5": dict(embed_dims=(64, 128, 320, 512), mlp_ratios=(4, 4, 4, 4),
               depths=(3, 6, 40, 3)),
}
NUM_HEADS = (1, 2, 5, 8)
SR_RATIOS = (8, 4, 2, 1)

trunc_normal = nn.initializers.truncated_normal(0.02)


def _dense(f, name, dtype):
  return layers.dense(f, dtype=dtype, kernel_init=trunc_normal, name=name)


def _attend(q, k, v):                    # [N, L, h, d] -> [N, L, h, d]
  logits = dots.einsum("nqhd,nkhd->nhqk", q, k)
  attn = attention.softmax_in(logits, v.dtype)
  return dots.einsum("nhqk,nkhd->nqhd", attn, v)


def _attend_cpu_inference(q, k, v):      # attention.inference_cpu's form
  heads_first = lambda t: t.transpose(0, 2, 1, 3)  # noqa: E731
  return heads_first(attention.inference_cpu(*map(heads_first, (q, k, v))))


class Attention(nn.Module):
  dim: int
  num_heads: int
  sr_ratio: int
  hw: tuple
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "xla"     # layers.ATTENTION_IMPLS
  train: bool = False             # attention.attend's form

  @nn.compact
  def __call__(self, x):
    n, l, c = x.shape
    nh, hd = self.num_heads, self.dim // self.num_heads
    q = _dense(self.dim, "q", self.dtype)(x).reshape(n, l, nh, hd)
    kv_in = x
    if self.sr_ratio > 1:
      r = self.sr_ratio
      kv_in = x.reshape(n, *self.hw, c)
      kv_in = layers.PatchConv(self.dim, r, dtype=self.dtype,
                               name="sr")(kv_in).reshape(n, -1, c)
      kv_in = layers.layer_norm(1e-5, self.dtype, name="norm")(kv_in)
    kv = _dense(2 * self.dim, "kv", self.dtype)(kv_in).reshape(n, -1, 2, nh, hd)
    k, v = kv[:, :, 0], kv[:, :, 1]
    if self.attention_impl != "xla":
      out = layers.fused_attention(q, k, v, self.attention_impl)
    else:
      q = q * (hd ** -0.5)
      out = (_attend(q, k, v) if self.train else jax.lax.platform_dependent(
          q, k, v, cpu=_attend_cpu_inference, default=_attend))
    return _dense(self.dim, "proj", self.dtype)(out.reshape(n, l, c))


class DWConv(nn.Module):
  hw: tuple
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n, l, c = x.shape
    x = layers.DepthwiseConv(3, dtype=self.dtype, name="dwconv")(
        x.reshape(n, *self.hw, c))
    return x.reshape(n, l, c)


class Mlp(nn.Module):
  hidden: int
  hw: tuple
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = _dense(self.hidden, "fc1", self.dtype)(x)
    y = layers.gelu(DWConv(self.hw, self.dtype, name="dwconv")(y))
    return _dense(x.shape[-1], "fc2", self.dtype)(y)


def drop_path(module: nn.Module, x, rate, train: bool):
  """Stochastic depth per sample; `rate` may be traced (scanned blocks)."""
  if not train:
    return x
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)


class Block(nn.Module):
  """tokens [N, h*w, C], drop-path rate (scalar) -> tokens."""
  dim: int
  num_heads: int
  mlp_ratio: int
  sr_ratio: int
  hw: tuple
  train: bool = False
  scan: bool = False             # return (x, None) for nn.scan
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, rate):
    ln = lambda n: layers.layer_norm(1e-6, self.dtype, name=n)
    y = Attention(self.dim, self.num_heads, self.sr_ratio, self.hw,
                  self.dtype, self.attention_impl, self.train,
                  name="attn")(ln("norm1")(x))
    x = x + drop_path(self, y, rate, self.train)
    y = Mlp(self.dim * self.mlp_ratio, self.hw, self.dtype,
            name="mlp")(ln("norm2")(x))
    x = x + drop_path(self, y, rate, self.train)
    return (x, None) if self.scan else x


class PatchEmbed(nn.Module):
  """Overlapping patch embedding: conv (k, stride, pad k//2) + LayerNorm."""
  dim: int
  kernel: int
  stride: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel
    x = nn.Conv(self.dim, (k, k), strides=(self.stride, self.stride),
                padding=((k // 2, k // 2),) * 2, dtype=self.dtype,
                name="proj")(x)
    return layers.layer_norm(1e-5, self.dtype, name="norm")(x)


class PyramidVisionTransformerV2(nn.Module):
  """frames [N,H,W,3] -> 4 NHWC feature maps (strides 4, 8, 16, 32)."""
  variant: str = "b5"
  drop_path_rate: float = 0.1
  dtype: jnp.dtype = jnp.float32
  remat: bool | str = False         # layers.remat_module
  scan_layers: bool = False
  attention_impl: str = "xla"       # layers.ATTENTION_IMPLS

  @nn.compact
  def __call__(self, x, train: bool = False):
    spec = VARIANTS[self.variant]
    depths = spec["depths"]
    rates = np.linspace(0.0, self.drop_path_rate, sum(depths)).astype(np.float32)
    block_cls = layers.remat_module(Block, self.remat,
                                    prevent_cse=not self.scan_layers)
    outs, cur = [], 0
    for s in range(4):
      dim = spec["embed_dims"][s]
      k, stride = (7, 4) if s == 0 else (3, 2)
      x = PatchEmbed(dim, k, stride, self.dtype,
                     name=f"patch_embed{s + 1}")(x)
      n, h, w, _ = x.shape
      t = x.reshape(n, h * w, dim)
      kwargs = dict(dim=dim, num_heads=NUM_HEADS[s],
                    mlp_ratio=spec["mlp_ratios"][s], sr_ratio=SR_RATIOS[s],
                    hw=(h, w), train=train, dtype=self.dtype,
                    attention_impl=self.attention_impl)
      stage_rates = jnp.asarray(rates[cur:cur + depths[s]])
      if self.scan_layers:
        scanned = nn.scan(block_cls, variable_axes={"params": 0},
                          split_rngs={"params": True, "dropout": True},
                          in_axes=0, length=depths[s])
        t, _ = scanned(**kwargs, scan=True, name=f"block{s + 1}")(
            t, stage_rates)
      else:
        for i in range(depths[s]):
          t = block_cls(**kwargs, name=f"block{s + 1}_{i}")(t, stage_rates[i])
      cur += depths[s]
      t = layers.layer_norm(1e-6, self.dtype, name=f"norm{s + 1}")(t)
      x = t.reshape(n, h, w, dim)
      outs.append(x)
    return outs
