"""Training losses of the original (its `scripts/*/loss.py`), NHWC.

Every loss returns per-frame values; the step reduces them with per-frame
weights (`gt_flag`: which frames carry a label) as sum(w * l) / sum(w). For
S4 this equals the original's "frames 0, 5, 10, ..." selection (it hard-codes
a stride of 5; the flag works for any T), for AVSS it is exactly the
original's flag weighting, for MS3 all weights are 1.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from avsegformer_jax import errors, layers


def dice_per_frame(logits, target):
  """1 - 2 sum(p g) / (sum(p^2) + 1e-3 + sum(g^2) + 1e-3), p = sigmoid.

  logits, target: [N, H, W] -> [N].
  """
  p = jax.nn.sigmoid(logits.astype(jnp.float32)).reshape(logits.shape[0], -1)
  g = target.astype(jnp.float32).reshape(target.shape[0], -1)
  num = 2.0 * jnp.sum(p * g, -1)
  den = jnp.sum(p * p, -1) + 0.001 + jnp.sum(g * g, -1) + 0.001
  return 1.0 - num / den


def bce_per_frame(logits, target):
  """nn.BCELoss on sigmoid probabilities (logs clamped at -100), per frame."""
  p = jax.nn.sigmoid(logits.astype(jnp.float32))
  g = target.astype(jnp.float32)
  log_p = jnp.maximum(jnp.log(p), -100.0)
  log_1p = jnp.maximum(jnp.log1p(-p), -100.0)
  loss = -(g * log_p + (1 - g) * log_1p)
  return loss.reshape(loss.shape[0], -1).mean(-1)


def cross_entropy_per_frame(logits, labels):
  """Mean over pixels of softmax cross entropy; logits [N,H,W,C], labels [N,H,W]."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), -1)
  return nll.reshape(nll.shape[0], -1).mean(-1)


def mix_per_frame(mask_feature, foreground, fn=dice_per_frame):
  """The auxiliary mixing loss: `fn` (Dice by default) of the channel-mean of
  the mixed mask feature, bilinearly upsampled to the label size, against the
  binary foreground."""
  m = mask_feature.astype(jnp.float32).mean(-1, keepdims=True)   # [N,h,w,1]
  m = layers.resize_bilinear(m, foreground.shape[1:3])[..., 0]
  return fn(m, foreground)


LOSSES = ("dice", "bce", "ce")


def check_loss(loss_type, task: str | None = None) -> None:
  """With `task`: ce is AVSS's loss over class ids, dice and bce S4/MS3's
  over 0/1 masks. The wrong pair was not named: ce over S4's one logit is
  NaN at every foreground pixel (the run stopped as "diverged"), dice read
  AVSS's class ids as mask values and trained without an error."""
  if loss_type not in LOSSES:
    raise errors.ConfigError(f"train.loss must be one of {LOSSES}, got "
                             f"{loss_type!r}")
  if task is not None and (task == "avss") != (loss_type == "ce"):
    want = "'ce'" if task == "avss" else "'dice' or 'bce'"
    raise errors.ConfigError(f"train.loss must be {want} for task {task!r}, "
                             f"got {loss_type!r} (configs/{task}.py sets it)")


def per_frame_losses(logits, mask_feature, labels, loss_type: str):
  """(main loss [N], mix loss [N]) for logits [N,H,W,C] and labels [N,H,W]."""
  check_loss(loss_type)
  if loss_type == "ce":       # AVSS: mix term is Dice on (label > 0)
    fg = (labels > 0).astype(jnp.float32)
    return (cross_entropy_per_frame(logits, labels),
            mix_per_frame(mask_feature, fg))
  # S4/MS3: the same loss for both terms
  fn = dice_per_frame if loss_type == "dice" else bce_per_frame
  fg = labels.astype(jnp.float32)
  return fn(logits[..., 0], fg), mix_per_frame(mask_feature, fg, fn)


def weighted_mean(values, weights):
  w = weights.astype(jnp.float32)
  return jnp.sum(values * w) / jnp.maximum(jnp.sum(w), 1e-12)
