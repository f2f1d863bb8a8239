"""Cross-modal transformer decoder (paper Sec. "Transformer Decoder").

The mixed (audio + learnable) queries attend to each other and densely to the
encoder memory of all three levels; no positional embedding on either side
(as the original). Six post-norm layers; only the last output is used.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from avsegformer_jax import layers


class DecoderLayer(nn.Module):
  dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, memory, train: bool = False):
    drop = lambda x: nn.Dropout(self.dropout, deterministic=not train)(x)
    mha = lambda n: layers.MultiheadAttention(
        self.dim, self.num_heads, use_bias=True, dropout=self.dropout,
        dtype=self.dtype, name=n)
    query = query + drop(mha("self_attn")(query, query, query, train=train))
    query = layers.layer_norm(dtype=self.dtype, name="norm1")(query)
    query = query + drop(mha("cross_attn")(query, memory, memory, train=train))
    query = layers.layer_norm(dtype=self.dtype, name="norm2")(query)
    y = layers.dense(self.ffn_dim, dtype=self.dtype, name="linear1")(query)
    y = layers.dense(self.dim, dtype=self.dtype, name="linear2")(
        drop(layers.gelu(y)))
    return layers.layer_norm(dtype=self.dtype, name="norm3")(query + drop(y))


class Decoder(nn.Module):
  """query [N,Q,C], memory [N,S,C] -> [N,Q,C] (last layer)."""
  num_layers: int = 6
  dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1
  remat: bool = False
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, memory, train: bool = False):
    layer_cls = nn.remat(DecoderLayer, static_argnums=(3,)) if self.remat \
        else DecoderLayer
    for i in range(self.num_layers):
      query = layer_cls(self.dim, self.num_heads, self.ffn_dim, self.dropout,
                        dtype=self.dtype, name=f"layers_{i}")(query, memory,
                                                              train)
    return query
