"""The train and eval steps: per-device code mapped over a `data` mesh axis.

Each step is written for one device's shard of the batch, with named-axis
collectives (`lax.psum` over "data") for gradients, batch-norm statistics and
metric sums, and mapped with `jax.shard_map` under `jax.jit` over a mesh of
all devices: the successor of a pmapped step (jax.pmap is itself built on
shard_map since JAX 0.8). Multi-host works the same way, each process feeding
its local part of the global batch.

Losses are normalised globally: a device contributes sum(w * l) / sum_all(w),
and gradients are summed over devices, so 1 and N devices give the same
update (the per-frame weights differ between clips for S4 and AVSS, which a
mean of per-device means would get wrong).
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from avsegformer_jax import avsegformer, errors, losses, metrics, visualize

AXIS = "data"
# Parameter groups: VGGish is always frozen (never differentiated, no state);
# the visual backbone is frozen for the first `train.freeze_backbone_epochs`.
MAIN_GROUP = ("audio_proj", "head")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any          # {"main": ..., "backbone": ... or None}
  rng: jax.Array


def make_mesh(devices=None) -> Mesh:
  return Mesh(np.asarray(devices or jax.devices()), (AXIS,))


def _psum(x):
  """`lax.psum` over the data axis, none on a one-device mesh: XLA emits it
  as an all-reduce there too, a copy of every gradient (77 ms of the CPU S4
  PVTv2-B5 train step). The steps' shard_map does not check replication."""
  return x if lax.axis_size(AXIS) == 1 else lax.psum(x, AXIS)


def optimizer(config) -> optax.GradientTransformation:
  """torch.optim.AdamW with the original's settings (no schedule); with
  `train.grad_accum_steps` k > 1, applied every k-th step to the mean of
  the k steps' gradients (zero updates in between): a batch of k*B clips
  where B fit the device, up to batch-norm statistics (over B) and the
  per-frame loss normalisation (each step's own, as the original's)."""
  tx = optax.adamw(config.train.learning_rate, b1=0.9, b2=0.999,
                   eps=config.train.get("adam_eps", 1e-8),
                   weight_decay=config.train.weight_decay)
  k = config.train.get("grad_accum_steps", 1)
  return optax.MultiSteps(tx, every_k_schedule=k) if k > 1 else tx


def create_train_state(config, model, rng, variables=None) -> TrainState:
  """Fresh state; `variables` (e.g. pretrained) replaces the random init."""
  init_rng, rng = jax.random.split(rng)
  if variables is None:
    variables = avsegformer.init_variables(model, init_rng,
                                           min(config.data.image_size, 64))
  params = variables["params"]
  tx = optimizer(config)
  opt_state = {"main": tx.init({k: params[k] for k in MAIN_GROUP}),
               "backbone": None}
  if config.train.freeze_backbone_epochs <= 0:
    opt_state["backbone"] = tx.init(params["backbone"])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}),
                    opt_state=opt_state, rng=rng)


def unfreeze_backbone(state: TrainState, config) -> TrainState:
  """Give the backbone its optimizer state when its frozen epochs end (as
  torch's AdamW, whose per-parameter state starts at the first gradient)."""
  if state.opt_state["backbone"] is not None:
    return state
  opt = dict(state.opt_state,
             backbone=optimizer(config).init(state.params["backbone"]))
  return state.replace(opt_state=opt)


def _flat(batch, key, tail):
  x = batch[key]
  return x.reshape((-1,) + x.shape[2:]) if tail is None else x.reshape(
      (-1,) + tail)


def normalize_frames(frames, valid):
  """uint8 RGB [N,H,W,3] -> ImageNet-normalised float32, on the device.

  The input pipeline ships uint8 frames (a quarter of the bytes through its
  worker pipes and to the device, and no float pass on the host); this is
  the original's ToTensor + Normalize. Frames with `valid` [N] = 0 become
  exact zeros, as the original pads AVSS clips after normalising.
  """
  x = (frames.astype(jnp.float32) / 255.0 - visualize.MEAN) / visualize.STD
  return jnp.where(valid[:, None, None, None] > 0, x, 0.0)


def _model_inputs(batch):
  """(frames [N,H,W,3] float32, audio, labels [N,H,W] int32, vid [N]) of a
  batch whose frames are uint8 (the pipeline's) or already normalised."""
  frames, vid = _flat(batch, "frames", None), _flat(batch, "vid_flag", ())
  if frames.dtype == jnp.uint8:
    frames = normalize_frames(frames, vid)
  return (frames, _flat(batch, "audio", None),
          _flat(batch, "masks", None).astype(jnp.int32), vid)


def supervised_every(config, num_frames: int) -> int:
  """T when training supervises frame 0 of each clip only (S4:
  `train.first_frame_only`), else 1: the model then runs the head (and
  VGGish, and a backbone without batch norm) on those frames alone — the
  same loss and gradients at a fraction of the cost (tests/test_train_step.py)."""
  return num_frames if config.train.get("first_frame_only", False) else 1


def clip_frames(config, model) -> int:
  """Frames per training clip the step needs from the pipeline: 1 under
  `train.first_frame_only` when the backbone keeps no batch statistics
  (PVTv2: frames 1..T-1 reach neither the loss nor any statistic, so they
  need not be decoded, resized or copied to the device), else all T."""
  if (config.train.get("first_frame_only", False)
      and not getattr(model.backbone, "batch_statistics", False)):
    return 1
  return config.data.num_frames


def check_supervision(batch, config):
  """Host-side guard for `supervised_every`: a batch that supervises frames
  other than the first under `train.first_frame_only` would silently lose
  them, so it is an error."""
  flag = np.asarray(batch["gt_flag"])
  if supervised_every(config, flag.shape[1]) > 1 and flag[:, 1:].any():
    raise errors.InputError(
        "train.first_frame_only is set but the training data supervise "
        "frames after the first (gt_flag); set "
        "--config.train.first_frame_only=False for this data")


# Bit generators for dropout (`train.prng_impl`). The state's key stays a
# threefry key (checkpoints and resumption do not depend on the choice);
# "rbg" draws dropout bits with XLA's RngBitGenerator (Philox on GPU: ~25
# integer ops per 32-bit word against threefry's ~80, and threefry is what
# bounds the dropout kernels on a GPU, benchmarks/README.md). Its bits may
# differ between backends and XLA versions (the rate and scaling do not).
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def prng_impl(config) -> str:
  impl = config.train.get("prng_impl", "threefry2x32")
  if impl not in PRNG_IMPLS:
    raise errors.ConfigError(f"train.prng_impl must be one of {PRNG_IMPLS}, "
                     f"got {impl!r}")
  return impl


def dropout_key(key, impl: str):
  """The dropout key of one step from the state's threefry key."""
  if impl == "threefry2x32":
    return key
  data = jax.random.bits(key, (4,), jnp.uint32)      # an rbg key is 4 words
  return jax.random.wrap_key_data(data, impl=impl)


def train_step(state: TrainState, batch, *, model, config):
  """One optimisation step on this device's shard (call through `Steps.train`)."""
  frozen = state.opt_state["backbone"] is None
  groups = MAIN_GROUP if frozen else MAIN_GROUP + ("backbone",)
  frames, audio, labels, vid = _model_inputs(batch)
  weights = _flat(batch, "gt_flag", ())
  every = supervised_every(config, batch["frames"].shape[1])
  if every > 1:          # S4: only frame 0 of each clip reaches the loss
    labels, weights = labels[::every], weights[::every]
  rng = dropout_key(
      jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                         lax.axis_index(AXIS)), prng_impl(config))
  denom = jnp.maximum(_psum(weights.sum()), 1e-12)
  has_bn = bool(jax.tree_util.tree_leaves(state.batch_stats))
  t = config.train

  def loss_fn(trainable):
    variables = {"params": {**state.params, **trainable}}
    if has_bn:
      variables["batch_stats"] = state.batch_stats
    (logits, mask_feature), new_vars = model.apply(
        variables, frames, audio, vid, train=True, rngs={"dropout": rng},
        mutable=["batch_stats"] if has_bn else [], head_every=every)
    main, mix = losses.per_frame_losses(logits, mask_feature, labels, t.loss)
    main = jnp.sum(main * weights) / denom
    mix = jnp.sum(mix * weights) / denom
    loss = t.iou_loss_weight * main + t.mix_loss_weight * mix
    return loss, (new_vars, main, mix)

  trainable = {k: state.params[k] for k in groups}
  grads, (new_vars, main, mix) = jax.grad(loss_fn, has_aux=True)(trainable)
  grads = _psum(grads)
  tx = optimizer(config)
  params, opt_state = dict(state.params), dict(state.opt_state)
  main_tree = {k: trainable[k] for k in MAIN_GROUP}
  upd, opt_state["main"] = tx.update({k: grads[k] for k in MAIN_GROUP},
                                     state.opt_state["main"], main_tree)
  params.update(optax.apply_updates(main_tree, upd))
  if not frozen:
    upd, opt_state["backbone"] = tx.update(
        grads["backbone"], state.opt_state["backbone"], trainable["backbone"])
    params["backbone"] = optax.apply_updates(trainable["backbone"], upd)
  stats = _psum({"iou_loss": main, "mix_loss": mix})
  stats["loss"] = t.iou_loss_weight * stats["iou_loss"] + \
      t.mix_loss_weight * stats["mix_loss"]
  stats["grad_norm"] = optax.tree.norm(grads)
  new_state = state.replace(
      step=state.step + 1, params=params, opt_state=opt_state,
      batch_stats=new_vars.get("batch_stats", state.batch_stats))
  return new_state, stats


def eval_step(variables, batch, *, model, config):
  """Metric sums of one global batch, the logits, and the metrics' per-frame
  stats (for per-clip scores)."""
  frames, audio, labels, vid = _model_inputs(batch)
  # [B] -> [B*T]: host padding clips count nowhere.
  valid = jnp.repeat(batch["clip_valid"], batch["frames"].shape[1])
  logits, _ = model.apply(variables, frames, audio, vid)
  if config.task == "avss":
    # The original scores every frame of a clip, padded ones included
    # (logits 0 -> background = label 0); `clip_valid` drops host padding.
    frame = metrics.semantic_frame_stats(logits, labels, valid,
                                         config.model.num_classes)
  else:
    w = _flat(batch, "gt_flag", ()) * valid
    frame = metrics.binary_frame_stats(logits[..., 0], labels, w)
  return _psum(metrics.sum_frames(frame)), logits, frame


class Steps:
  """The jitted, shard_mapped steps for one model/config/mesh."""

  def __init__(self, model, config, mesh):
    prng_impl(config)                      # a bad name fails here, not traced
    avsegformer.check_platform(config, mesh.devices.flat[0].platform)
    self.mesh = mesh
    spec = dict(mesh=mesh, in_specs=(P(), P(AXIS)), check_vma=False)
    self._train = jax.jit(jax.shard_map(
        functools.partial(train_step, model=model, config=config),
        out_specs=(P(), P()), **spec), donate_argnums=(0,))
    self._eval = jax.jit(jax.shard_map(
        functools.partial(eval_step, model=model, config=config),
        out_specs=(P(), P(AXIS), P(AXIS)), **spec))

  def train(self, state, batch):
    """(state, global batch) -> (state, summed loss stats); retraces once
    when the backbone unfreezes (the state gains its optimizer state)."""
    return self._train(state, batch)

  def eval(self, variables, batch):
    return self._eval(variables, batch)


def shard_batch(batch, mesh):
  """Host numpy batch (this process's part) -> global arrays split over `data`."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items() if not k.startswith("meta_")}


def replicate(tree, mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))
