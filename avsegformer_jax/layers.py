"""Small building blocks shared by the components, with the original's numerics.

torch's LayerNorm/GroupNorm compute the variance as E[(x - mean)^2]; Flax's
default "fast variance" (E[x^2] - E[x]^2) loses digits on the large-mean
activations of this model, so the parity path turns it off.
"""
from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from avsegformer_jax.attention import attend
from avsegformer_jax.dots import WEIGHT_DOT, conv_general_dilated, dot_general
from avsegformer_jax.dropout import DROPOUT_MASK, Dropout

Dtype = Any

xavier_uniform = nn.initializers.xavier_uniform()


def layer_norm(eps: float = 1e-5, dtype: Dtype = jnp.float32, name=None):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, use_fast_variance=False,
                      name=name)


def group_norm(groups: int = 32, eps: float = 1e-5, dtype: Dtype = jnp.float32,
               name=None):
  return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype,
                      use_fast_variance=False, name=name)


def conv(features: int, kernel: int, *, stride: int = 1, padding: int = 0,
         use_bias: bool = True, dtype: Dtype = jnp.float32, name=None,
         kernel_init=xavier_uniform, groups: int = 1):
  """A torch-style Conv2d (symmetric explicit padding) in NHWC."""
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 use_bias=use_bias, dtype=dtype, kernel_init=kernel_init,
                 feature_group_count=groups, name=name,
                 conv_general_dilated=conv_general_dilated)


class DepthwiseConv(nn.Module):
  """Depthwise k x k conv (stride 1, 'same' padding) as k*k shifted
  multiply-adds: the same parameters as `nn.Conv(feature_group_count=C)`
  (kernel [k,k,1,C], bias [C]), but XLA's CPU backend runs grouped
  convolutions slowly (its filter gradient about 20x slower than this),
  while the shifted form fuses into one loop on CPU and GPU. TPUs run the
  grouped convolution itself (`_grouped_depthwise`) from GROUPED_MIN_BATCH
  images up, where XLA:TPU's cost model has it faster."""
  kernel_size: int = 3
  dtype: Dtype = jnp.float32
  kernel_init: Any = xavier_uniform

  @nn.compact
  def __call__(self, x):                                   # x [N,H,W,C]
    k, c = self.kernel_size, x.shape[-1]
    kernel = self.param("kernel", self.kernel_init, (k, k, 1, c))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    tpu = (_grouped_depthwise if x.shape[0] >= GROUPED_MIN_BATCH
           else _shifted_depthwise)
    return jax.lax.platform_dependent(
        x.astype(self.dtype), kernel.astype(self.dtype),
        bias.astype(self.dtype), tpu=tpu, default=_shifted_depthwise)


class PatchConv(nn.Module):
  """A conv whose kernel is its stride (r x r, 'VALID') as one GEMM over the
  non-overlapping r x r patches: the parameters and init of `nn.Conv(
  features, (r, r), strides=(r, r), padding="VALID")`. XLA:CPU runs such a
  conv's backward at a few GFLOP/s (PVTv2-B5's stage-3 spatial reduction:
  ~10 ms a block, 7% of the train step, benchmarks/profile.py); as a GEMM it
  is a weight dot like the others (float32-accumulated bfloat16 on CPU, kept
  by remat_policy="dots")."""
  features: int
  patch: int
  dtype: Dtype = jnp.float32
  kernel_init: Any = nn.initializers.lecun_normal()    # nn.Conv's default

  @nn.compact
  def __call__(self, x):                   # [N, H, W, C] -> [N, H/r, W/r, F]
    r, (n, h, w, c) = self.patch, x.shape
    kernel = self.param("kernel", self.kernel_init, (r, r, c, self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    hp, wp = h // r, w // r                # 'VALID' drops a remainder
    p = x[:, :hp * r, :wp * r].astype(self.dtype)
    p = p.reshape(n, hp, r, wp, r, c).transpose(0, 1, 3, 2, 4, 5)
    p = p.reshape(n, hp, wp, r * r * c)    # (dy, dx, c): the kernel's order
    y = dot_general(p, kernel.reshape(r * r * c, self.features).astype(
        self.dtype), (((3,), (0,)), ((), ())))
    return y + bias.astype(self.dtype)


def cpu_fence(fn, *args):
  """fn(*args) as both branches of a conditional, for XLA:CPU programs.

  XLA:CPU fuses nothing across a conditional's boundary (and removes
  optimization barriers before it fuses), so this keeps a producer's loop
  apart from a consumer that makes it slower when merged. The predicate
  depends on the data, so XLA cannot fold it away; both branches are fn,
  so it cannot change the result."""
  first = jnp.ravel(args[0])
  if not first.size:
    return fn(*args)
  return jax.lax.cond(first[0] != 0, fn, fn, *args)


def _windows(x, k):
  """The k*k shifted windows of x ('same' zero padding), in kernel order."""
  p, h, w = k // 2, x.shape[1], x.shape[2]
  xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  return [xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)]


def _depthwise_sum(x, kernel, bias, acc=None):         # kernel [k,k,1,C]
  """The k*k shifted multiply-adds and the bias, summed in `acc` (None: x's
  dtype) and rounded to x's dtype once."""
  acc = acc or x.dtype
  out = None
  taps = kernel.astype(acc).reshape(-1, kernel.shape[-1])
  # Converted before the windows are cut: the same values, and XLA:CPU then
  # reads the nine windows of one float32 array instead of converting each.
  for t, win in zip(taps, _windows(x.astype(acc), kernel.shape[0])):
    term = win * t
    out = term if out is None else out + term
  return (out + bias.astype(acc)).astype(x.dtype)


# On CPU the sum is made in float32: a bfloat16 one there converts every
# multiply-add to float32 and back (bf16 PVTv2-B5 stage 3's dwconv + GELU
# fusion: 4.5 -> 2.7 ms per block; the autodiff backward ~35% faster). On a
# GPU the float32 sum made XLA's plan of the S4 train step move ~1 GB more
# (H100 roofline 21.0 -> 21.3 ms), so GPUs and TPUs keep x's dtype. The same
# in float32 everywhere.
_depthwise_sum_f32 = functools.partial(_depthwise_sum, acc=jnp.float32)


def _depthwise_cpu(x, kernel, bias):
  """The float32 sum kept out of its consumer's fusion: merged with
  PVTv2's GELU, XLA:CPU's loop runs the erf far slower than alone. With the
  conversion before the windows, PVTv2-B5's dwconv + GELU in bfloat16 (5
  frames at 224, interleaved with the form before, bit-identical): stage 3
  3.0-3.3 -> 1.8-2.0 ms a block, stage 2 4.9-6.2 -> 2.8-3.6, stage 1
  12.0-12.2 -> 7.3-7.5."""
  return cpu_fence(_depthwise_sum_f32, x, kernel, bias)


def _depthwise_forward(x, kernel, bias):
  return jax.lax.platform_dependent(x, kernel, bias, cpu=_depthwise_cpu,
                                    default=_depthwise_sum)


# Below 8 images XLA:TPU's grouped convolution is the slower one (v5e cost
# model: 1.5-2.7x the shifted form's time forward at 1-6 images).
GROUPED_MIN_BATCH = 8


def _grouped_depthwise(x, kernel, bias):
  """XLA's grouped convolution, for TPUs: by XLA:TPU's cost model (v5e,
  bf16, with a GELU) 2-4x the shifted form's speed forward+backward from 8
  images up (stage 3, 14 x 14 x 1280: 8 images 0.25 -> 0.07 ms, 40 images
  1.30 -> 0.32; stage 1, 56 x 56 x 256, 40 images 4.87 -> 1.49 ms);
  benchmarks/tpu_cost.py."""
  k = kernel.shape[0]
  y = jax.lax.conv_general_dilated(
      x, kernel, (1, 1), [(k // 2, k // 2)] * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=x.shape[-1])
  return y + bias


@jax.custom_vjp
def _shifted_depthwise(x, kernel, bias):
  """Residuals: x, not its k*k shifted windows (plain autodiff keeps all
  nine for the kernel gradient: 2.9 GB for PVTv2-B5's stage 3 at batch 16);
  the backward rebuilds them."""
  return _depthwise_forward(x, kernel, bias)


def _shifted_depthwise_fwd(x, kernel, bias):
  return _depthwise_forward(x, kernel, bias), (x, kernel, bias)


def _depthwise_bwd_autodiff(x, kernel, bias, g):
  return jax.vjp(_depthwise_sum, x, kernel, bias)[1](g)


def _depthwise_bwd_direct(x, kernel, bias, g, acc=None, per_tap=False):
  """dx: the same shifted sum over g with the flipped kernel; the kernel
  gradient: float32 sums over the windows, by default one stacked reduction,
  which XLA:GPU fuses into one kernel (autodiff's backward wrote the nine
  products x_win * g and read them back in nine reductions: 2.2 -> 0.4 ms of
  the S4 PVTv2-B5 train step by the H100 roofline).

  XLA:CPU (`acc=float32, per_tap=True`): dx summed in float32 and rounded
  once, each tap's kernel gradient its own [positions, C] column sum (the
  stacked reduction runs slower there: 56x56x512, 441 vs 304 ms). Autodiff's
  backward transposed the nine windows into nine padded bf16 adds: bf16
  stage 3 (14x14x1280) 23 -> 6 ms, stage 1 (56x56x256) 76 -> 34 ms."""
  dx = _depthwise_sum(g, kernel[::-1, ::-1], jnp.zeros((), g.dtype), acc)
  g32 = g.astype(jnp.float32).reshape(-1, g.shape[-1])       # [positions, C]
  wins = [w.astype(jnp.float32).reshape(g32.shape)
          for w in _windows(x, kernel.shape[0])]
  if per_tap:
    dk = jnp.stack([jnp.sum(w * g32, 0) for w in wins])
  else:
    dk = jnp.sum(jnp.stack(wins) * g32[None], axis=1)
  return (dx.astype(x.dtype), dk.reshape(kernel.shape).astype(kernel.dtype),
          jnp.sum(g32, 0).astype(bias.dtype))


_depthwise_bwd_cpu = functools.partial(_depthwise_bwd_direct,
                                       acc=jnp.float32, per_tap=True)


def _shifted_depthwise_bwd(res, g):
  # Chosen when the step is lowered; TPUs keep autodiff's backward (where
  # DepthwiseConv itself runs `_grouped_depthwise`).
  return jax.lax.platform_dependent(
      *res, g, cpu=_depthwise_bwd_cpu, tpu=_depthwise_bwd_autodiff,
      default=_depthwise_bwd_direct)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


def dense(features: int, *, use_bias: bool = True, dtype: Dtype = jnp.float32,
          name=None, kernel_init=xavier_uniform):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype,
                  kernel_init=kernel_init, name=name, dot_general=dot_general)


_SQRT_HALF = 0.7071067811865476


def gelu(x):
  """torch's nn.GELU(): x * (1 + erf(x / sqrt(2))) / 2, computed in float32.

  torch's formula rather than jax.nn.gelu's erfc form: XLA expands erfc into
  ~70 float ops, an exp and two divisions per element, which left the
  GELUs of the FFNs and PVTv2's MLPs ALU-bound on a GPU (by the roofline,
  ~18 ms of the 58 ms S4 PVTv2-B5 eval step at 32 clips); erf is one short
  rational approximation, and the fusion becomes memory-bound. (erfc is
  more accurate where |gelu(x)| < 1e-3, x < -3; torch has this one's
  rounding there too.)
  """
  y = x.astype(jnp.float32)
  return (y * 0.5 * (1.0 + jax.lax.erf(y * _SQRT_HALF))).astype(x.dtype)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """F.interpolate(mode='bilinear', align_corners=False) for upsampling NHWC.

  Half-pixel centres with edge clamping. Integer up-scales (the model's x2,
  x4 and to-label-size) take two taps per output along each axis; other
  sizes go through jax.image.resize, which builds dense [out, in]
  interpolation matrices (the head's x4 at 224: 230 ms of a 5.5 s CPU eval).
  """
  n, h, w, c = x.shape
  if size[0] % h == 0 and size[1] % w == 0 and size[0] >= h and size[1] >= w:
    # W before H, as torch's upsample_bilinear2d nests its lambdas.
    return _upsample_axis(_upsample_axis(x, 2, size[1] // w), 1, size[0] // h)
  return jax.image.resize(x, (n, size[0], size[1], c), method="linear",
                          antialias=False)


def _upsample_axis(x: jax.Array, axis: int, s: int) -> jax.Array:
  """Linear x`s` along `axis`: output s*i+r reads inputs i and i-1 or i+1.

  Its source coordinate is i + (r+.5)/s - .5; past the edges the neighbour
  is the edge itself (torch clamps the source index).
  """
  if s == 1:
    return x
  n = x.shape[axis]
  # Neighbours as slices of the edge-padded input, not concatenations:
  # XLA:GPU fuses pad + slice into the consumer but wrote each concatenated
  # neighbour to memory (the head's x4: 1 GB each at 32 clips).
  pad = [(0, 0)] * x.ndim
  pad[axis] = (1, 1)
  xp = jnp.pad(x, pad, mode="edge")
  prev = jax.lax.slice_in_dim(xp, 0, n, axis=axis)
  nxt = jax.lax.slice_in_dim(xp, 2, n + 2, axis=axis)
  offs = [(r + 0.5) / s - 0.5 for r in range(s)]   # each in (-0.5, 0.5)
  shape = [1] * (x.ndim + 1)
  shape[axis + 1] = s
  wt = lambda v: jnp.asarray(v, x.dtype).reshape(shape)
  ex = lambda a: jnp.expand_dims(a, axis + 1)
  # One broadcasted expression for all phases: XLA fuses it into one loop.
  y = (wt([1.0 - abs(o) for o in offs]) * ex(x)
       + wt([-o if o < 0 else 0.0 for o in offs]) * ex(prev)
       + wt([o if o > 0 else 0.0 for o in offs]) * ex(nxt))  # [.., n, s, ..]
  return y.reshape(x.shape[:axis] + (n * s,) + x.shape[axis + 1:])


# `model.attention_impl`: "xla" computes the attention maps with XLA's
# GEMMs and softmax; "cudnn" calls cuDNN's flash attention through
# `jax.nn.dot_product_attention`, which never writes the [B, h, Lq, Lk] maps
# to memory (the decoder's cross-attention maps are larger than its GEMMs:
# benchmarks/README.md). cuDNN runs 16-bit compute on NVIDIA GPUs only.
# Measured on an H200, it makes the S4 train step 33% slower: opt-in.
ATTENTION_IMPLS = ("xla", "cudnn")


def fused_attention(q, k, v, implementation: str = "cudnn"):
  """softmax(q k^T / sqrt(d)) v through `jax.nn.dot_product_attention`.

  q [B,Lq,h,d], k/v [B,Lk,h,d] -> [B,Lq,h,d]. Lengths are padded to
  multiples of 8 (cuDNN's tensor-core tiles; jax's cuDNN training path also
  rejects odd lengths) and the real key length is passed, so padded keys
  are masked; padded queries are dropped. `implementation="xla"` runs the
  same wrapper anywhere (the tests' check of this padding).
  """
  lq, lk = q.shape[1], k.shape[1]
  pq, pk = -lq % 8, -lk % 8
  lengths = {}
  if pq or pk:
    widths = lambda p: ((0, 0), (0, p), (0, 0), (0, 0))  # noqa: E731
    q = jnp.pad(q, widths(pq))
    k, v = jnp.pad(k, widths(pk)), jnp.pad(v, widths(pk))
    lengths["key_value_seq_lengths"] = jnp.full((q.shape[0],), lk, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, implementation=implementation,
                                     **lengths)
  return out[:, :lq]


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention (batch_first) with split q/k/v projections.

  The converter splits torch's stacked `in_proj_weight` into q/k/v_proj.
  `use_bias=False` matches `bias=False` (no in-projection or out bias).
  """
  dim: int
  num_heads: int
  use_bias: bool = True
  dropout: float = 0.0           # on the attention weights, as torch
  dtype: Dtype = jnp.float32
  # Sequence lengths padded to a multiple of this (None: 8 for 16-bit
  # compute, else 1). XLA:GPU pads 16-bit GEMM operands to multiples of 8
  # for the tensor cores by copying them: with 300 queries and 1029 keys that
  # is a copy of every attention map before each GEMM that reads one. Padded
  # keys are masked out of the softmax, padded queries dropped: same result.
  pad_to: int | None = None
  # ATTENTION_IMPLS. "cudnn" falls back to "xla" where attention dropout is
  # drawn (training with dropout > 0): jax's public API has none.
  impl: str = "xla"
  dropout_impl: str = "bernoulli"  # dropout.DROPOUT_IMPLS

  @nn.compact
  def __call__(self, q, k, v, *, train: bool = False):
    h, d = self.num_heads, self.dim // self.num_heads
    mk = lambda n: dense(self.dim, use_bias=self.use_bias, dtype=self.dtype,
                         name=n)
    q = mk("q_proj")(q).reshape(q.shape[:-1] + (h, d))
    k = mk("k_proj")(k).reshape(k.shape[:-1] + (h, d))
    v = mk("v_proj")(v).reshape(v.shape[:-1] + (h, d))
    out_proj = dense(self.dim, use_bias=self.use_bias, dtype=self.dtype,
                     name="out_proj")
    if self.impl != "xla" and not (train and self.dropout > 0):
      out = fused_attention(q, k, v, self.impl)
      return out_proj(out.reshape(out.shape[:2] + (-1,)))
    # Heads-first operands ([B,h,L,d]): XLA:CPU's batched dot runs these
    # layouts ~20% faster than the same einsums on [B,L,h,d].
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q * (d ** -0.5), k, v))
    mult = self.pad_to or (8 if jnp.dtype(self.dtype).itemsize == 2 else 1)
    drop = (Dropout(self.dropout, impl=self.dropout_impl)
            if train and self.dropout > 0 else None)
    out = attend(q, k, v, train=train, pad_to=mult,
                 dropout=drop).transpose(0, 2, 1, 3)
    return out_proj(out.reshape(out.shape[:2] + (-1,)))


# Rematerialisation modes (`model.remat` on, `model.remat_policy`): "full"
# recomputes a block's whole forward in its backward; "dots" keeps the outputs
# of its weight GEMMs (no batch dimensions: not the attention maps) and
# recomputes the rest (norms, activations, attention), which on a GPU is
# memory traffic saved rather than FLOPs spent (benchmarks/README.md). Both
# keep the dropout masks (`Dropout`) and what is named REMAT_KEEP: outputs
# small next to the work that makes them (TPU's deformable-attention core).
REMAT_POLICIES = ("full", "dots")
REMAT_KEEP = "remat_keep"


def remat_module(module_cls, mode, *, prevent_cse: bool = True):
  """`module_cls` rematerialised per `mode` (False, True = "full", "dots")."""
  if not mode:
    return module_cls
  cp = jax.checkpoint_policies
  if mode is True or mode == "full":
    return nn.remat(module_cls, prevent_cse=prevent_cse,
                    policy=cp.save_only_these_names(DROPOUT_MASK, REMAT_KEEP))
  if mode == "dots":
    return nn.remat(module_cls, prevent_cse=prevent_cse,
                    policy=cp.save_from_both_policies(
                        cp.dots_with_no_batch_dims_saveable,
                        cp.save_only_these_names(DROPOUT_MASK, WEIGHT_DOT,
                                                 REMAT_KEEP)))
  raise ValueError(f"remat mode must be one of {REMAT_POLICIES}, got {mode!r}")


def repeat(layer_cls, num: int, kwargs: dict, x, *args,
           remat: bool | str = False, scan: bool = False):
  """Apply `num` layers `layer_cls(**kwargs)` in sequence to x.

  Unrolled, they are named layers_0..layers_{num-1}, like the original's
  ModuleList. With `scan`, one `nn.scan` over a stacked `layers` (parameters
  gain a leading [num] axis; the converter stacks them) keeps compile time
  flat in depth. The layer must take a `scan` field and then return
  (x, None). Extra args are broadcast to every layer.
  """
  cls = remat_module(layer_cls, remat, prevent_cse=not scan)
  if not scan:
    for i in range(num):
      x = cls(**kwargs, name=f"layers_{i}")(x, *args)
    return x
  scanned = nn.scan(cls, variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,) * len(args), length=num)
  x, _ = scanned(**kwargs, scan=True, name="layers")(x, *args)
  return x
