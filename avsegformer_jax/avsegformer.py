"""AVSegFormer (Gao et al., AAAI 2024): the whole model, and `build_model`.

Every frame is an independent batch item (N = B*T): the visual backbone and
VGGish run per frame, `audio_proj` maps the 128-d VGGish embedding to the
single audio token, and `AVSegHead` does the rest. `frame_mask` (AVSS's
`vid_temporal_mask_flag`) zeroes padded frames' backbone features, logits and
mask feature, exactly as the original.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from avsegformer_jax import deformable_attention, dropout, errors, layers, mixer
from avsegformer_jax.head import AVSegHead

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class AVSegFormer(nn.Module):
  backbone: nn.Module
  vggish: nn.Module
  head: AVSegHead
  embed_dim: int = 256
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, frames, audio, frame_mask=None, train: bool = False,
               head_every: int = 1):
    """frames [N,H,W,3], audio [N,96,64], frame_mask [N] or None.

    Returns (logits [N,H,W,C] float32, mask_feature [N,H/4,W/4,C'] float32).

    `head_every=k` (static) returns frames 0, k, 2k, ... only ([N/k, ...]):
    the S4 train step, whose loss sees frame 0 of each clip, so the other
    frames' head, VGGish and (unless batch statistics tie the frames
    together: ResNet-50 in training) backbone work is skipped. Every frame
    is an independent batch item otherwise, so the kept frames' outputs are
    what the full call gives them.
    """
    k = head_every
    if k > 1:
      if frames.shape[0] % k:
        raise ValueError(f"head_every={k} does not divide N={frames.shape[0]}")
      audio = audio[::k]
      if not (train and getattr(self.backbone, "batch_statistics", False)):
        frames = frames[::k]
        frame_mask = None if frame_mask is None else frame_mask[::k]
        k = 1                           # nothing left to drop after the backbone
    # VGGish is always frozen in the original: no gradient flows into it.
    emb = jax.lax.stop_gradient(self.vggish(audio.astype(self.dtype)))
    self.sow("intermediates", "vggish_embedding", emb)
    audio_feat = layers.dense(self.embed_dim, dtype=self.dtype,
                              name="audio_proj")(emb)[:, None, :]  # [N,1,C]
    self.sow("intermediates", "audio_feat", audio_feat)
    feats = self.backbone(frames.astype(self.dtype), train=train)
    if frame_mask is not None:
      m = frame_mask.astype(self.dtype)[:, None, None, None]
      feats = [f * m for f in feats]
    if k > 1:                           # batch statistics saw every frame
      feats = [f[::k] for f in feats]
      frame_mask = None if frame_mask is None else frame_mask[::k]
    for i, f in enumerate(feats):
      self.sow("intermediates", f"backbone_mean_{i}", f.mean((1, 2)))
    logits, mask_feature = self.head(feats, audio_feat, train=train)
    if frame_mask is not None:
      m = frame_mask.astype(logits.dtype)[:, None, None, None]
      logits, mask_feature = logits * m, mask_feature * m
    return logits.astype(jnp.float32), mask_feature.astype(jnp.float32)


def _model_config(config) -> ml_collections.ConfigDict:
  return config.model if "model" in config else config


def _remat(mc):
  """False, or the rematerialisation mode of `model.remat_policy`."""
  policy = mc.get("remat_policy", "full")
  if policy not in layers.REMAT_POLICIES:
    raise errors.ConfigError(
        f"model.remat_policy must be one of "
        f"{layers.REMAT_POLICIES}, got {policy!r}")
  return policy if mc.remat else False


def _attention_impl(mc) -> str:
  """`model.attention_impl`, checked against the compute dtype."""
  impl = mc.get("attention_impl", "xla")
  if impl not in layers.ATTENTION_IMPLS:
    raise errors.ConfigError(
        f"model.attention_impl must be one of "
        f"{layers.ATTENTION_IMPLS}, got {impl!r}")
  if impl == "cudnn" and mc.dtype == "float32":
    raise errors.ConfigError(
        "model.attention_impl='cudnn' needs 16-bit compute "
        "(model.dtype='bfloat16'): cuDNN's flash attention has "
        "no float32 kernel")
  return impl


def _attention_dropout(mc) -> float:
  """`model.attention_dropout`, unset (None): `model.dropout`, as the
  original's decoder, whose torch MHA shares the layer's dropout."""
  rate = mc.get("attention_dropout", None)
  return mc.dropout if rate is None else rate


def check_platform(config, platform: str) -> None:
  """Fails early, naming the option, where a config asks for kernels that
  `platform` ("cpu", "gpu", "tpu") does not have (not at trace time, from
  inside jax)."""
  mc = _model_config(config)
  if _attention_impl(mc) == "cudnn" and platform != "gpu":
    raise errors.ConfigError(
        "model.attention_impl='cudnn' (cuDNN flash attention) "
        f"runs on NVIDIA GPUs only, and this run's devices are "
        f"{platform!r}: use model.attention_impl='xla'")
  if mc.get("msda_impl", "auto") == "pallas" and platform != "gpu":
    raise errors.ConfigError(
        "model.msda_impl='pallas' (a Triton kernel) runs on "
        f"GPUs only, and this run's devices are {platform!r}: "
        "use model.msda_impl='auto'")


def check_config(config, platform: str) -> None:
  """A full config's model and input settings, checked before any work: a
  bad one otherwise fails inside a traced step (or, as a negative learning
  rate, not at all). Raises ConfigError naming the field."""
  from datasets.avsbench import raw  # pylint: disable=g-import-not-at-top
  if config.task not in raw.TASKS:
    raise errors.ConfigError(f"task must be one of {sorted(raw.TASKS)}, got "
                             f"{config.task!r}")
  # AVSS masks hold AVSBench's 71 class ids (0: background), S4/MS3 ones
  # 0/1 read from a single logit: another count trains on labels out of
  # range, or scores the wrong channel, without an error.
  classes = raw.AVSS_NUM_CLASSES if config.task == "avss" else 1
  if config.model.num_classes != classes:
    raise errors.ConfigError(
        f"model.num_classes must be {classes} for task {config.task!r}, got "
        f"{config.model.num_classes} (configs/{config.task}.py sets it)")
  build_model(config)                  # model.* choices but the mixer's
  mixer.check_kind(config.model.mixer)  # (met when the head is traced)
  check_platform(config, platform)
  size = config.data.image_size
  if size < 32 or size % 4:
    # The head's masks are 4x its stride-4 features: other sizes come back
    # rounded up to a multiple of 4, and no longer match their labels.
    raise errors.ConfigError(
        f"data.image_size must be a multiple of 4 and at least 32, got {size}")
  if config.data.num_frames < 1:
    raise errors.ConfigError(
        f"data.num_frames must be at least 1, got {config.data.num_frames}")


def _check_sizes(mc) -> None:
  """Sizes and rates that otherwise fail deep in a traced step (a zero
  width divides by zero at init) or not at all (a dropout rate of 1.5, a
  drop-path rate of 1 trains on NaNs)."""
  least = {"embed_dim": 1, "num_heads": 1, "num_points": 1,
           "num_queries": 1, "encoder_ffn_dim": 1, "decoder_ffn_dim": 1,
           "query_ffn_dim": 1, "head_mlp_dim": 1, "vggish_fc_dim": 1,
           # 0 layers: a stage left out (an ablation), which runs
           "num_encoder_layers": 0, "num_decoder_layers": 0,
           "num_query_layers": 0}
  for field, low in least.items():
    if field in mc and mc[field] < low:
      raise errors.ConfigError(
          f"model.{field} must be at least {low}, got {mc[field]}")
  if not 1 <= mc.num_levels <= 3:
    raise errors.ConfigError(   # the encoder's strides 8, 16, 32
        f"model.num_levels must be 1, 2 or 3, got {mc.num_levels}")
  for field in ("dropout", "attention_dropout", "drop_path"):
    rate = mc.get(field)
    if rate is not None and not 0 <= rate < 1:
      raise errors.ConfigError(
          f"model.{field} must be in [0, 1), got {rate}")


def build_backbone(mc, dtype, axis_name=None):
  if mc.backbone == "res50":
    from avsegformer_jax import resnet
    return resnet.ResNet50(dtype=dtype, remat=_remat(mc), axis_name=axis_name,
                           parent=None), \
        (256, 512, 1024, 2048)
  if mc.backbone == "pvt2":
    from avsegformer_jax import pvt_v2
    variant = mc.get("pvt_variant", "b5")
    if variant not in pvt_v2.VARIANTS:
      raise errors.ConfigError(
          f"model.pvt_variant must be one of "
          f"{sorted(pvt_v2.VARIANTS)}, got {variant!r}")
    module = pvt_v2.PyramidVisionTransformerV2(
        variant=variant, drop_path_rate=mc.drop_path, dtype=dtype,
        remat=_remat(mc), scan_layers=mc.scan_layers,
        attention_impl=_attention_impl(mc), parent=None)
    return module, tuple(pvt_v2.VARIANTS[variant]["embed_dims"])
  raise errors.ConfigError(
      f"model.backbone must be 'res50' or 'pvt2', got "
      f"{mc.backbone!r}")


def build_model(config, axis_name: str | None = None) -> AVSegFormer:
  """The Flax module for a full config (or its `model` sub-config).

  `axis_name`: the mesh axis that training batch-norm statistics are
  synchronised over (ResNet-50 only; see train.py).
  """
  from avsegformer_jax import vggish
  mc = _model_config(config)
  if mc.dtype not in DTYPES:
    raise errors.ConfigError(
        f"model.dtype must be one of {sorted(DTYPES)}, "
        f"got {mc.dtype!r}")
  dtype = DTYPES[mc.dtype]
  if mc.get("msda_impl", deformable_attention.DEFAULT_IMPL) not in \
      deformable_attention.IMPLS:
    raise errors.ConfigError(
        f"model.msda_impl must be one of "
        f"{deformable_attention.IMPLS}, got {mc.msda_impl!r}")
  _check_sizes(mc)
  if mc.embed_dim % 32 or mc.embed_dim % mc.num_heads:
    raise errors.ConfigError(
        "model.embed_dim must be a multiple of 32 (GroupNorm "
        f"groups) and of num_heads, got {mc.embed_dim}")
  backbone, _ = build_backbone(mc, dtype, axis_name)
  head = AVSegHead(
      num_classes=mc.num_classes, embed_dim=mc.embed_dim,
      num_heads=mc.num_heads, num_levels=mc.num_levels,
      num_points=mc.num_points, num_encoder_layers=mc.num_encoder_layers,
      num_decoder_layers=mc.num_decoder_layers,
      num_query_layers=mc.num_query_layers,
      encoder_ffn_dim=mc.encoder_ffn_dim, decoder_ffn_dim=mc.decoder_ffn_dim,
      query_ffn_dim=mc.query_ffn_dim, num_queries=mc.num_queries,
      learnable_queries=mc.learnable_queries, mixer=mc.mixer,
      head_mlp_dim=mc.head_mlp_dim, dropout=mc.dropout,
      attention_dropout=_attention_dropout(mc),
      remat=_remat(mc),
      scan_layers=mc.scan_layers,
      msda_impl=mc.get("msda_impl", deformable_attention.DEFAULT_IMPL),
      attention_impl=_attention_impl(mc), dtype=dtype,
      dropout_impl=dropout.check_impl(mc.get("dropout_impl", "bernoulli")),
      parent=None)
  return AVSegFormer(backbone=backbone,
                     vggish=vggish.VGGish(fc_dim=mc.get("vggish_fc_dim", 4096),
                                          dtype=dtype, parent=None),
                     head=head, embed_dim=mc.embed_dim, dtype=dtype)


def init_variables(model: AVSegFormer, rng, image_size: int = 64,
                   num_frames: int = 1):
  """Random-initialised variables (shapes do not depend on image size).

  Jitted: run eagerly, init dispatches ~2000 single ops, each compiled on
  its own (about a minute on 2 CPU cores); as one program the forward pass
  it traces is dead code and only the initialisers run.
  """
  frames = jnp.zeros((num_frames, image_size, image_size, 3), jnp.float32)
  audio = jnp.zeros((num_frames, 96, 64), jnp.float32)

  def init(r):
    variables = model.init({"params": r, "dropout": r}, frames, audio)
    return {k: v for k, v in variables.items()
            if k in ("params", "batch_stats")}
  return jax.jit(init)(rng)


def cast_weights(variables, dtype):
  """`variables` with the weights a `dtype` model casts on every call
  (the kernels and biases of its dense layers and convolutions: each
  sub-dict of "params" that holds a "kernel") cast to `dtype` once.

  For evaluation and inference: with float32 weights, every bfloat16 call
  converts them all again (PVTv2-B5 + VGGish: ~150M values; 13% of the
  kernel time of a bfloat16 eval on a 2-core CPU, 15% of the H100 eval
  roofline; benchmarks/README.md). Those modules use nothing but the
  converted values, so the outputs are the same bit for bit; norms,
  embeddings and batch statistics stay as they are. Training keeps float32
  weights: the optimiser updates them.
  """
  dtype = jnp.dtype(dtype)
  if dtype == jnp.float32:
    return variables

  def cast(tree):
    if not isinstance(tree, Mapping):       # dicts, and flax's FrozenDict
      return tree
    if "kernel" in tree:
      return {k: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating)
              else v for k, v in tree.items()}
    return {k: cast(v) for k, v in tree.items()}

  # One program: leaf by leaf, each distinct shape would compile its own.
  return {**variables, "params": jax.jit(cast)(dict(variables["params"]))}


def variable_shapes(model: AVSegFormer, image_size: int = 64):
  """Shape/dtype tree of the variables without allocating them."""
  return jax.eval_shape(
      lambda r: init_variables(model, r, image_size), jax.random.PRNGKey(0))
