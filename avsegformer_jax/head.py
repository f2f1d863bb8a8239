"""AVSegHead: everything between the backbones and the logits (paper Fig. 3).

in_proj (1x1 conv + GN) per level -> encoder over strides 8/16/32 -> mask
feature at stride 4 (lateral 1x1 conv of the stride-4 level + upsampled
level-0 memory, 3x3 conv, GN, ReLU) -> mixer. The query generator's audio
queries (+ learnable queries) pass the decoder; their product with the mask
feature goes through an MLP over the *query* axis (1x1 convs 300-2048-2048-256),
is added to the mask feature, and `fc` (conv, x4 bilinear, conv, ReLU, 1x1)
gives the logits at full resolution.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from avsegformer_jax import dots, layers
from avsegformer_jax.decoder import Decoder
from avsegformer_jax.deformable_attention import DEFAULT_IMPL
from avsegformer_jax.encoder import Encoder, sine_position_encoding
from avsegformer_jax.mixer import build_mixer
from avsegformer_jax.query_generator import QueryGenerator


class Transformer(nn.Module):
  """Encoder + decoder under one name, as the original's `head.transformer`."""
  encoder: nn.Module
  decoder: nn.Module

  def __call__(self, src, pos, query, train: bool = False):
    memory = self.encoder(src, pos, train)
    return memory, self.decoder(query, memory, train)


class QueryProduct(nn.Module):
  """The MLP's first 1x1 conv applied to the query x mask-feature product.

  conv1(einsum(dec, mf)) = mf . (dec^T W1): W1 is folded into the decoder
  output once per frame, so the [N,H,W,300] product is never formed and the
  per-pixel contraction is over C=256 instead of 300 (product + MLP for 5
  frames at 224 on 2 CPU cores: 1.58 -> 1.39 s). Parameters as `nn.Dense`.
  """
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, mask_feature):
    """queries [N,Q,C], mask_feature [N,H,W,C] -> [N,H,W,features]."""
    kernel = self.param("kernel", layers.xavier_uniform,
                        (queries.shape[1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    queries, mask_feature, kernel, bias = nn.dtypes.promote_dtype(
        queries, mask_feature, kernel, bias, dtype=self.dtype)
    folded = dots.einsum("nqc,qf->ncf", queries, kernel)          # [N,C,F]
    return dots.einsum("nhwc,ncf->nhwf", mask_feature, folded) + bias


class QueryMLP(nn.Module):
  """The original's `MLP` of 1x1 convs over the query axis (held as Dense),
  taking the queries and the mask feature whose product it transforms."""
  dims: Sequence[int]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, mask_feature):
    x = QueryProduct(self.dims[0], dtype=self.dtype, name="layers_0")(
        queries, mask_feature)
    for i, width in enumerate(self.dims[1:], 1):
      x = layers.dense(width, dtype=self.dtype, name=f"layers_{i}")(nn.relu(x))
    return x


def _phase_taps(s: int) -> np.ndarray:
  """[s, 3, 3]: in 1-D, the weight of input i + a - 1 in upsampled pixel
  s*i + p + k - 1 (phase p, conv tap k) away from the edges; x`s` linear,
  half-pixel centres (`layers.resize_bilinear`)."""
  taps = np.zeros((s, 3, 3))
  for p in range(s):
    for k in range(3):
      i, r = divmod(p + k - 1, s)          # that pixel is phase r of input i
      src = (r + 0.5) / s - 0.5            # its source, relative to input i
      lo = int(np.floor(src))
      taps[p, k, i + lo + 1] += lo + 1 - src
      taps[p, k, i + lo + 2] += src - lo
  return taps


def _conv(x, kernel, padding):
  return lax.conv_general_dilated(x, kernel, (1, 1), padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _upsample(x, s):
  return layers.resize_bilinear(x, (x.shape[1] * s, x.shape[2] * s))


def _upsampled_conv(x, kernel, phase_kernel, s):
  """conv3x3(upsample_s(x)) as one 3x3 conv of x with s*s*F outputs.

  Each of the s x s output phases is a fixed 3x3 filter of the edge-padded
  input (edge padding is the upsampling's clamping). Only the outer rows and
  columns read the conv's zero padding instead; they are recomputed exactly
  from two upsampled rows (columns) each."""
  n, h, w, _ = x.shape
  f = kernel.shape[-1]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  y = _conv(xp, phase_kernel, "VALID").reshape(n, h, w, s, s, f)
  y = y.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * s, w * s, f)
  top = _conv(_upsample(x[:, :2], s)[:, :2], kernel, ((1, 0), (1, 1)))
  bottom = _conv(_upsample(x[:, -2:], s)[:, -2:], kernel, ((0, 1), (1, 1)))
  left = _conv(_upsample(x[:, :, :2], s)[:, :, :2], kernel, ((1, 1), (1, 0)))
  right = _conv(_upsample(x[:, :, -2:], s)[:, :, -2:], kernel,
                ((1, 1), (0, 1)))
  # Selects fuse into one pass; four in-place updates took ~20 ms more.
  rows = lax.broadcasted_iota(jnp.int32, (1, h * s, 1, 1), 1)
  cols = lax.broadcasted_iota(jnp.int32, (1, 1, w * s, 1), 2)
  y = jnp.where(rows == 0, top, jnp.where(rows == h * s - 1, bottom, y))
  return jnp.where(cols == 0, left, jnp.where(cols == w * s - 1, right, y))


class UpsampledConv(nn.Module):
  """`fc`'s x`scale` bilinear upsampling and the 3x3 conv after it
  (padding 1), with that conv's parameters (`nn.Conv`'s names and init).

  On CPU the pair runs as one 3x3 conv of the low-resolution map with
  scale^2 x the output channels: XLA:CPU's conv with 32 outputs at 224x224
  ran at 85-115 GFLOP/s, the same FLOPs at 56x56 with 512 outputs at about
  twice that, and the 4x larger upsampled map is never written (S4 head, 5
  frames at 224, bfloat16, upsampling + conv + ReLU: 175-188 -> 82-93 ms,
  2-core Xeon). On TPU, by XLA:TPU's cost model (v5e, 20 frames, with the
  ReLU), forward 17.2 -> 7.2 ms, forward+backward 29.2 -> 6.6 ms
  (benchmarks/tpu_cost.py), so TPUs take it too. GPUs keep
  upsample-then-conv until measured: the H100 roofline halves the bytes
  (80 frames: forward+backward 2.7 -> 1.5 ms) but quadruples the kernels
  (11 -> 50), and launches are what it leaves out.
  """
  features: int
  scale: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c, s = x.shape[-1], self.scale
    kernel = self.param("kernel", layers.xavier_uniform,
                        (3, 3, c, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (self.features,),
                      jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)

    def plain(v):
      return _conv(_upsample(v, s), kernel, ((1, 1), (1, 1)))
    if s == 1 or min(x.shape[1:3]) < 2:
      return plain(x) + bias

    def phased(v):
      taps = _phase_taps(s)
      # [3,3,C,F] -> [3,3,C,s*s*F], combined in float32 from the kernel in
      # the compute dtype: weights cast once (`cast_weights`) give the same.
      phase_kernel = jnp.einsum(
          "klcf,pka,qlb->abcpqf", kernel.astype(jnp.float32), taps, taps,
          precision=lax.Precision.HIGHEST).reshape(3, 3, c, -1)
      return _upsampled_conv(v, kernel, phase_kernel.astype(v.dtype), s)
    y = lax.platform_dependent(x, cpu=phased, tpu=phased, default=plain)
    return y + bias


class AVSegHead(nn.Module):
  num_classes: int = 1
  embed_dim: int = 256
  num_heads: int = 8
  num_levels: int = 3
  num_points: int = 4
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  num_query_layers: int = 6
  encoder_ffn_dim: int = 2048
  decoder_ffn_dim: int = 2048
  query_ffn_dim: int = 1024
  num_queries: int = 300
  learnable_queries: bool = True
  mixer: str = "cha"
  head_mlp_dim: int = 2048
  dropout: float = 0.1
  attention_dropout: float = 0.1    # the decoder's, on its attention maps
  remat: bool | str = False         # layers.remat_module
  scan_layers: bool = False
  msda_impl: str = DEFAULT_IMPL
  attention_impl: str = "xla"       # layers.ATTENTION_IMPLS (not the MSDA)
  dtype: jnp.dtype = jnp.float32
  dropout_impl: str = "bernoulli"   # dropout.DROPOUT_IMPLS

  @nn.compact
  def __call__(self, feats: Sequence[jax.Array], audio: jax.Array,
               train: bool = False):
    """feats: 4 NHWC maps (strides 4..32); audio [N,1,C] -> (logits, mask_feature)."""
    c, dt = self.embed_dim, self.dtype
    n = feats[0].shape[0]

    def conv_gn(x, name, kernel=1, relu=False):
      x = layers.conv(c, kernel, padding=kernel // 2, dtype=dt,
                      name=f"{name}_0")(x)
      x = layers.group_norm(dtype=dt, name=f"{name}_1")(x)
      return nn.relu(x) if relu else x

    proj = [conv_gn(f, f"in_proj_{i}") for i, f in enumerate(feats)]
    srcs = proj[1:1 + self.num_levels]
    shapes = tuple((s.shape[1], s.shape[2]) for s in srcs)
    level_embed = self.param("level_embed", nn.initializers.normal(1.0),
                             (self.num_levels, c))
    pos = jnp.concatenate(
        [jnp.asarray(sine_position_encoding(h, w, c // 2)) + level_embed[l]
         for l, (h, w) in enumerate(shapes)], 0).astype(dt)          # [S, C]
    src = jnp.concatenate([s.reshape(n, -1, c) for s in srcs], 1)

    query = QueryGenerator(self.num_query_layers, self.num_queries, c,
                           self.num_heads, self.query_ffn_dim,
                           remat=self.remat, scan_layers=self.scan_layers,
                           dtype=dt, attention_impl=self.attention_impl,
                           name="query_generator")(audio)
    self.sow("intermediates", "query_mean", query.mean(1))
    if self.learnable_queries:
      learn = nn.Embed(self.num_queries, c, name="learnable_query",
                       embedding_init=layers.xavier_uniform)
      query = query + learn.embedding[None].astype(query.dtype)
    transformer = Transformer(
        Encoder(self.num_encoder_layers, c, self.encoder_ffn_dim,
                self.dropout, self.num_levels, self.num_heads,
                self.num_points, shapes, remat=self.remat,
                scan_layers=self.scan_layers, msda_impl=self.msda_impl,
                dtype=dt, dropout_impl=self.dropout_impl, parent=None),
        Decoder(self.num_decoder_layers, c, self.num_heads,
                self.decoder_ffn_dim, self.dropout, remat=self.remat,
                scan_layers=self.scan_layers, dtype=dt,
                attention_impl=self.attention_impl,
                attention_dropout=self.attention_dropout,
                dropout_impl=self.dropout_impl, parent=None),
        name="transformer")
    memory, dec = transformer(src, pos[None], query, train)

    # Mask feature at stride 4.
    h0, w0 = shapes[0]
    starts = [0]
    for h, w in shapes:
      starts.append(starts[-1] + h * w)
    self.sow("intermediates", "memory_mean", jnp.stack(
        [memory[:, a:b].mean(1) for a, b in zip(starts[:-1], starts[1:])], 1))
    self.sow("intermediates", "decoder_mean", dec.mean(1))
    level0 = memory[:, :h0 * w0].reshape(n, h0, w0, c)
    lateral = conv_gn(proj[0], "lateral_conv")
    mask_feature = lateral + layers.resize_bilinear(level0, lateral.shape[1:3])
    mask_feature = conv_gn(mask_feature, "out_conv", kernel=3, relu=True)
    mixer = build_mixer(self.mixer, c, self.num_heads, dt, "fusion_block")
    if mixer is not None:
      mask_feature = mixer(mask_feature, audio)

    # Prediction: queries x mask feature, MLP over the query axis, fc.
    pred = QueryMLP((self.head_mlp_dim, self.head_mlp_dim, c), dtype=dt,
                    name="mlp")(dec, mask_feature)
    x = mask_feature + pred
    x = layers.conv(128, 3, padding=1, dtype=dt, name="fc_0")(x)
    x = nn.relu(UpsampledConv(32, 4, dtype=dt, name="fc_2")(x))
    logits = layers.conv(self.num_classes, 1, use_bias=False, dtype=dt,
                         name="fc_4")(x)
    return logits, mask_feature
