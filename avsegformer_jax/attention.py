"""The attention core, softmax(q k^T) v, and its float32 softmax.

Two forms of one product. Training, and every call on a GPU or TPU, makes
the normalised maps p = softmax(l) in float32, keeps them in the compute
dtype and multiplies p v: the maps are what attention dropout drops and
what the backward keeps (`softmax_in`). An inference call on CPU takes the
logits straight from the product in float32 (no bfloat16 round trip), pads
no sequence length (the multiples of 8 are for GPU tensor cores) and, where
there are more keys than channels per head, defers the normalisation:
exp(l - max l) v divided by the row sums afterwards, [B, h, Lq, d]
divisions instead of [B, h, Lq, Lk]. XLA:CPU's elementwise passes over the
maps are most of an attention call there: the decoder's cross-attention
core ([5, 8, 300] queries, 1029 keys) 72.6 -> 58.8 ms in bfloat16, its
self-attention 12.1 -> 9.6 ms (2-core Xeon), and closer to the exact
result. `lax.platform_dependent` lowers only the compiling platform's
form, so GPU and TPU programs are unchanged; differentiating the inference
form is correct but keeps its float32 maps, so training passes `train`.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from avsegformer_jax.dots import matmul


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_in(logits, dtype):
  """Softmax over the last axis computed in float32, returned in `dtype`.

  Its backward keeps only that `dtype` result: autodiff of
  `softmax(x.astype(f32)).astype(dtype)` keeps the float32 probabilities
  too, in bfloat16 twice the bytes of the attention maps (the decoder's
  [B, 8, 300, 1029] per layer). In float32 the two are the same."""
  return jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_in_fwd(logits, dtype):
  p = softmax_in(logits, dtype)
  return p, (p, jnp.zeros((0,), logits.dtype))


def _softmax_in_bwd(dtype, res, g):
  p, like = res
  p, g = p.astype(jnp.float32), g.astype(jnp.float32)
  d = p * (g - jnp.sum(g * p, axis=-1, keepdims=True))
  return (d.astype(like.dtype),)


softmax_in.defvjp(_softmax_in_fwd, _softmax_in_bwd)


def _with_maps(q, k, v, pad_to: int = 1, dropout: Callable | None = None):
  """Normalised maps in the compute dtype, optionally dropped, times v."""
  lq, lk = q.shape[2], k.shape[2]
  pq, pk = -lq % pad_to, -lk % pad_to
  if pq or pk:
    widths = lambda p: ((0, 0), (0, 0), (0, p), (0, 0))  # noqa: E731
    q = jnp.pad(q, widths(pq))
    k, v = jnp.pad(k, widths(pk)), jnp.pad(v, widths(pk))
  logits = matmul(q, k.transpose(0, 1, 3, 2))                   # [B,h,Lq,Lk]
  if pk:
    logits = jnp.where(jnp.arange(lk + pk) < lk, logits, -jnp.inf)
  attn = softmax_in(logits, v.dtype)
  if dropout is not None:
    attn = dropout(attn)
  return matmul(attn, v)[:, :, :lq]


# Maps above _CHUNK_ABOVE bytes (float32) are made in pieces of at most
# _CHUNK_BYTES, one (batch, head) group at a time (`lax.map`). The decoder's
# cross-attention core ([5, 8, 300] queries, 1029 keys: 49 MB of maps),
# bfloat16 on the 2-core Xeon: alone 57-74 ms whole, 29-45 ms in 4-10
# pieces (2 pieces: no gain); in the model's eval step, where fusions inside
# a loop run slower, the layer's cross-attention 52 -> 44-47 ms. The 14 MB
# maps of a 300-query self-attention were slower in pieces.
_CHUNK_ABOVE = 32 << 20
_CHUNK_BYTES = 8 << 20


def inference_cpu(q, k, v):
  """The same product for XLA:CPU inference (module docstring)."""
  b, h, lq, _ = q.shape
  maps = b * h * lq * k.shape[2] * 4
  if maps > _CHUNK_ABOVE:
    groups = next((g for g in range(2, b * h)
                   if (b * h) % g == 0 and maps // g <= _CHUNK_BYTES), b * h)
    split = lambda t: t.reshape((groups, -1, 1) + t.shape[2:])  # noqa: E731
    out = lax.map(lambda qkv: _inference_cpu(*qkv),
                  tuple(map(split, (q, k, v))))        # [G, B*h/G, 1, Lq, d]
    return out.reshape(b, h, lq, v.shape[-1])
  return _inference_cpu(q, k, v)


def _inference_cpu(q, k, v):
  f32 = jnp.float32
  logits = jnp.matmul(q, k.transpose(0, 1, 3, 2), preferred_element_type=f32)
  e = jnp.exp(logits - logits.max(-1, keepdims=True))
  total = e.sum(-1, keepdims=True)
  if k.shape[2] <= q.shape[3]:         # fewer keys than channels: divide maps
    return matmul((e / total).astype(v.dtype), v)
  out = jnp.matmul(e.astype(v.dtype), v, preferred_element_type=f32)
  return (out / total).astype(v.dtype)


def attend(q, k, v, *, train: bool, pad_to: int = 1,
           dropout: Callable | None = None):
  """q [B,h,Lq,d] (already scaled), k/v [B,h,Lk,d] -> [B,h,Lq,d].

  `dropout` is applied to the normalised maps (training only); `pad_to`
  pads both lengths to its multiples where the maps are made (GPU/TPU, and
  training on CPU: masked keys, dropped queries, the same result)."""
  maps = functools.partial(_with_maps, pad_to=pad_to, dropout=dropout)
  if train:
    return maps(q, k, v)
  return lax.platform_dependent(q, k, v, cpu=inference_cpu, default=maps)
