"""Audio-visual mixer (paper Sec. "Audio-Visual Mixer", Fig. 4).

CHA (Fig. 4b, the default): the audio token queries the spatial tokens of the
mask feature (8 heads, softmax over all H*W positions); the result, projected
and passed through a sigmoid, gates the channels: `mask_feature * w`. This is
what the original code does (the paper writes F + F*w; the code wins).

CRA (Fig. 4a, the paper's first design, kept for the Table 2c ablation): the
spatial tokens query the audio token and the result is added back. With one
audio token per frame its softmax is 1, so CRA adds an audio-conditioned
per-channel bias, which is why it helps less.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from avsegformer_jax import attention, errors, layers


class ChannelAttentionMixer(nn.Module):
  """CrossModalMixer: mask_feature [N,h,w,C], audio [N,1,C] -> [N,h,w,C]."""
  dim: int = 256
  num_heads: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, feature_map, audio):
    n, h, w, c = feature_map.shape
    nh, d = self.num_heads, self.dim // self.num_heads
    tokens = feature_map.reshape(n, h * w, c)
    q = layers.dense(self.dim, use_bias=False, dtype=self.dtype,
                     name="q_proj")(audio).reshape(n, nh, d)
    kv = layers.dense(2 * self.dim, use_bias=False, dtype=self.dtype,
                      name="kv_proj")(tokens).reshape(n, h * w, 2, nh, d)
    x = jax.lax.platform_dependent(q * (d ** -0.5), kv, cpu=_one_query_cpu,
                                   default=_one_query).reshape(n, c)
    gate = jax.nn.sigmoid(layers.dense(self.dim, dtype=self.dtype,
                                       name="proj")(x))
    return feature_map * gate[:, None, None, :]             # works for N = 1


def _one_query(q, kv):
  """q [N,nH,d] (scaled) over kv [N,hw,2,nH,d] -> [N,nH,d]."""
  k, v = kv[:, :, 0], kv[:, :, 1]                            # [N, hw, nH, d]
  logits = jnp.einsum("nhd,nkhd->nhk", q, k)
  attn = attention.softmax_in(logits, v.dtype)
  return jnp.einsum("nhk,nkhd->nhd", attn, v)


def _one_query_cpu(q, kv):
  """The same as products and sums over kv's own layout, in float32: as
  einsums XLA:CPU first transposed k and v heads-first ([5, 3136, 8, 32]
  each at 224), 18.9 -> 5.0 ms in bfloat16 and closer to the exact result
  (the logits are not rounded to bfloat16)."""
  k, v = kv[:, :, 0].astype(jnp.float32), kv[:, :, 1].astype(jnp.float32)
  logits = jnp.sum(k * q.astype(jnp.float32)[:, None], -1)   # [N, hw, nH]
  attn = jax.nn.softmax(logits, axis=1)
  return jnp.sum(attn[..., None] * v, 1).astype(kv.dtype)


class CrossAttentionMixer(nn.Module):
  """CRA: spatial tokens attend to the audio token; residual add."""
  dim: int = 256
  num_heads: int = 8
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, feature_map, audio):
    n, h, w, c = feature_map.shape
    nh, d = self.num_heads, self.dim // self.num_heads
    tokens = feature_map.reshape(n, h * w, c)
    q = layers.dense(self.dim, use_bias=False, dtype=self.dtype,
                     name="q_proj")(tokens).reshape(n, h * w, nh, d)
    kv = layers.dense(2 * self.dim, use_bias=False, dtype=self.dtype,
                      name="kv_proj")(audio).reshape(n, -1, 2, nh, d)
    k, v = kv[:, :, 0], kv[:, :, 1]
    logits = jnp.einsum("nqhd,nkhd->nhqk", q * (d ** -0.5), k)
    attn = attention.softmax_in(logits, v.dtype)
    x = jnp.einsum("nhqk,nkhd->nqhd", attn, v).reshape(n, h * w, c)
    x = layers.dense(self.dim, dtype=self.dtype, name="proj")(x)
    return feature_map + x.reshape(n, h, w, c)


MIXERS = ("cha", "cra", "none")


def check_kind(kind) -> None:
  if kind not in MIXERS + ("", None):
    raise errors.ConfigError(f"model.mixer must be one of {MIXERS}, got "
                             f"{kind!r}")


def build_mixer(kind: str, dim: int, num_heads: int, dtype, name: str):
  check_kind(kind)
  if kind == "cha":
    return ChannelAttentionMixer(dim, num_heads, dtype=dtype, name=name)
  if kind == "cra":
    return CrossAttentionMixer(dim, num_heads, dtype=dtype, name=name)
  return None
