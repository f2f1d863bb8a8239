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
  train: bool = False
  scan: bool = False             # return (x, None) for nn.scan
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "xla"    # layers.ATTENTION_IMPLS
  attention_dropout: float = 0.1  # on the attention maps (torch MHA's)
  dropout_impl: str = "bernoulli"  # dropout.DROPOUT_IMPLS

  @nn.compact
  def __call__(self, query, memory):
    train = self.train
    drop = lambda x: layers.Dropout(self.dropout, deterministic=not train,
                                    impl=self.dropout_impl)(x)
    mha = lambda n: layers.MultiheadAttention(
        self.dim, self.num_heads, use_bias=True,
        dropout=self.attention_dropout, dropout_impl=self.dropout_impl,
        dtype=self.dtype, impl=self.attention_impl, name=n)
    query = query + drop(mha("self_attn")(query, query, query, train=train))
    query = layers.layer_norm(dtype=self.dtype, name="norm1")(query)
    query = query + drop(mha("cross_attn")(query, memory, memory, train=train))
    query = layers.layer_norm(dtype=self.dtype, name="norm2")(query)
    y = layers.dense(self.ffn_dim, dtype=self.dtype, name="linear1")(query)
    y = layers.dense(self.dim, dtype=self.dtype, name="linear2")(
        drop(layers.gelu(y)))
    query = layers.layer_norm(dtype=self.dtype, name="norm3")(query + drop(y))
    return (query, None) if self.scan else query


class Decoder(nn.Module):
  """query [N,Q,C], memory [N,S,C] -> [N,Q,C] (last layer)."""
  num_layers: int = 6
  dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout: float = 0.1
  remat: bool | str = False         # layers.remat_module
  scan_layers: bool = False
  dtype: jnp.dtype = jnp.float32
  attention_impl: str = "xla"
  attention_dropout: float = 0.1
  dropout_impl: str = "bernoulli"

  @nn.compact
  def __call__(self, query, memory, train: bool = False):
    kwargs = dict(dim=self.dim, num_heads=self.num_heads,
                  ffn_dim=self.ffn_dim, dropout=self.dropout, train=train,
                  dtype=self.dtype, attention_impl=self.attention_impl,
                  attention_dropout=self.attention_dropout,
                  dropout_impl=self.dropout_impl)
    return layers.repeat(DecoderLayer, self.num_layers, kwargs, query, memory,
                         remat=self.remat, scan=self.scan_layers)
