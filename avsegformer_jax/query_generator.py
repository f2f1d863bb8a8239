"""Query generator (paper Sec. "Query Generator").

300 learned initial queries attend to themselves and to the frame's single
audio token, giving audio-conditioned queries. Six post-norm layers; the
attention layers have no bias at all and there is no dropout (as the original).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from avsegformer_jax import layers


class QueryGeneratorLayer(nn.Module):
  dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 1024
  scan: bool = False             # return (x, None) for nn.scan
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "xla"    # layers.ATTENTION_IMPLS

  @nn.compact
  def __call__(self, query, audio):
    mha = lambda n: layers.MultiheadAttention(
        self.dim, self.num_heads, use_bias=False, dtype=self.dtype,
        impl=self.attention_impl, name=n)
    query = layers.layer_norm(dtype=self.dtype, name="norm1")(
        query + mha("self_attn")(query, query, query))
    query = layers.layer_norm(dtype=self.dtype, name="norm2")(
        query + mha("cross_attn")(query, audio, audio))
    y = layers.dense(self.ffn_dim, dtype=self.dtype, name="ffn_0")(query)
    y = layers.dense(self.dim, dtype=self.dtype, name="ffn_2")(layers.gelu(y))
    query = layers.layer_norm(dtype=self.dtype, name="norm3")(query + y)
    return (query, None) if self.scan else query


class QueryGenerator(nn.Module):
  """audio [N, 1, C] -> audio queries [N, num_queries, C]."""
  num_layers: int = 6
  num_queries: int = 300
  dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 1024
  remat: bool | str = False         # layers.remat_module
  scan_layers: bool = False
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, audio):
    emb = nn.Embed(self.num_queries, self.dim, name="query",
                   embedding_init=layers.xavier_uniform)
    query = jnp.broadcast_to(emb.embedding[None].astype(self.dtype),
                             (audio.shape[0], self.num_queries, self.dim))
    kwargs = dict(dim=self.dim, num_heads=self.num_heads,
                  ffn_dim=self.ffn_dim, dtype=self.dtype,
                  attention_impl=self.attention_impl)
    return layers.repeat(QueryGeneratorLayer, self.num_layers, kwargs, query,
                         audio, remat=self.remat, scan=self.scan_layers)
