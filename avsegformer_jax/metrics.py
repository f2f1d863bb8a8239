"""Evaluation metrics of the original, as sufficient statistics.

Each `*_stats` function is jit-able per-device code returning sums that can be
`lax.psum`-med over devices and added over batches. From the sums of one
global batch we get the original's per-batch numbers (its reported score is
the plain mean of those over batches, so it depends on the batch size); from
the sums over the whole split, dataset-level numbers that do not.

S4/MS3 (`scripts/*/utility.py`): mIoU at sigmoid > 0.5 with empty-gt frames
scored as true-negative / all pixels; F-measure with beta^2 = 0.3 over 255
thresholds, empty-gt frames skipped, max over thresholds of the averaged curve.
AVSS (`utils/compute_color_metrics.py`): per-frame, per-class IoU and F summed
over frames where the class is in the prediction or the label; final score is
the mean over all classes of sum/count (never-seen classes count 0).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BETA2 = 0.3


def _torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
  """torch.linspace in float32, bit for bit: float32 step, fused multiply-add
  from the start for the first half and from the end for the second."""
  start, end = float(np.float32(start)), float(np.float32(end))
  step = float(np.float32((np.float32(end) - np.float32(start))
                          / np.float32(steps - 1)))
  i = np.arange(steps)
  return np.where(i < steps // 2, start + step * i,
                  end - step * (steps - 1 - i)).astype(np.float32)


# torch.linspace(0, 1 - 1e-10, 255): the last is exactly 1.0, index 127 is 0.5.
THRESHOLDS = _torch_linspace_f32(0.0, 1.0 - 1e-10, 255)


def binary_frame_stats(logits, gt, weights):
  """Per frame, what `binary_stats` sums, for logits [N,H,W], gt [N,H,W] in
  {0,1}, weights [N] in {0,1}: iou_sum [N], frames [N], fcurve_sum [N,255],
  nonempty_frames [N] (float32), each weighted. Summed over a clip's or a
  category's frames, `binary_scores` gives its scores."""
  w = weights.astype(jnp.float32)
  n = logits.shape[0]
  logits = logits.reshape(n, -1).astype(jnp.float32)
  g = gt.reshape(n, -1).astype(jnp.float32)
  pred = (jax.nn.sigmoid(logits) > 0.5).astype(jnp.float32)
  inter = jnp.sum(pred * g, -1)
  union = jnp.sum(jnp.maximum(pred, g), -1)
  empty = jnp.sum(g, -1) == 0
  tn = jnp.sum((1 - g) * (1 - pred), -1)
  inter = jnp.where(empty, tn, inter)
  union = jnp.where(empty, float(g.shape[1]), union)
  iou = inter / (union + 1e-7)

  # F curve: p >= thr_i  <=>  i < #(thresholds <= p). Histogram the count.
  p = jax.nn.sigmoid(logits)
  level = jnp.searchsorted(jnp.asarray(THRESHOLDS), p, side="right")  # 0..255
  bins = len(THRESHOLDS) + 1
  hist_all = jax.vmap(lambda l: jnp.bincount(l, length=bins))(level)
  hist_pos = jax.vmap(lambda l, m: jnp.bincount(l, weights=m, length=bins))(
      level, g)
  # pred_count[i] = #(level > i) = sum over bins c > i.
  rev = lambda h: jnp.cumsum(h[:, ::-1], -1)[:, ::-1][:, 1:]        # [N,255]
  n_pred = rev(hist_all).astype(jnp.float32)
  tp = rev(hist_pos).astype(jnp.float32)
  prec = tp / (n_pred + 1e-20)
  rec = tp / (jnp.sum(g, -1, keepdims=True) + 1e-20)
  f = (1 + BETA2) * prec * rec / (BETA2 * prec + rec)
  f = jnp.where(jnp.isnan(f), 0.0, f)
  fw = w * (~empty)
  return {"iou_sum": iou * w, "frames": w, "fcurve_sum": f * fw[:, None],
          "nonempty_frames": fw}


def sum_frames(frame_stats):
  """Per-frame stats [N, ...] -> their sums over the N frames."""
  return jax.tree_util.tree_map(lambda x: jnp.sum(x, 0), frame_stats)


def binary_stats(logits, gt, weights):
  """S4/MS3 sums over the frames of `binary_frame_stats`: iou_sum, frames,
  fcurve_sum [255], nonempty_frames (float32)."""
  return sum_frames(binary_frame_stats(logits, gt, weights))


def binary_scores(stats) -> dict[str, float]:
  """mIoU and F (max over thresholds) from summed binary stats."""
  s = jax.tree_util.tree_map(np.asarray, stats)
  miou = float(s["iou_sum"] / max(float(s["frames"]), 1e-12))
  f = 0.0 if s["nonempty_frames"] == 0 else float(
      np.max(s["fcurve_sum"] / s["nonempty_frames"]))
  return {"miou": miou, "fscore": f}


def semantic_frame_stats(logits, labels, weights, num_classes: int):
  """Per frame, what `semantic_stats` sums, for logits [N,H,W,C], labels
  [N,H,W] int, weights [N]: iou_sum, fscore_sum, count [N,C] (count: the
  class is predicted or labelled), each weighted."""
  n = logits.shape[0]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  pred = jnp.argmax(probs, -1).reshape(n, -1)          # ties -> lowest index
  lab = labels.reshape(n, -1).astype(jnp.int32)
  count = jax.vmap(lambda x: jnp.bincount(x, length=num_classes))
  area_pred = count(pred).astype(jnp.float32)
  area_lab = count(lab).astype(jnp.float32)
  area_inter = count(jnp.where(pred == lab, lab, num_classes)).astype(jnp.float32)
  area_union = area_pred + area_lab - area_inter
  iou = area_inter / (2.220446049250313e-16 + area_union)
  prec = area_inter / area_pred
  rec = area_inter / area_lab
  f = (1 + BETA2) * prec * rec / (BETA2 * prec + rec)
  f = jnp.where(jnp.isnan(f), 0.0, f)
  w = weights.astype(jnp.float32)[:, None]
  return {"iou_sum": iou * w, "fscore_sum": f * w,
          "count": (area_union > 0) * w}


def semantic_stats(logits, labels, weights, num_classes: int):
  """AVSS sums over the frames of `semantic_frame_stats`: iou_sum [C],
  fscore_sum [C], count [C] (frames where the class is predicted or
  labelled)."""
  return sum_frames(semantic_frame_stats(logits, labels, weights,
                                         num_classes))


def semantic_scores(stats) -> dict:
  """The original's end-of-test AVSS numbers from summed semantic stats."""
  s = jax.tree_util.tree_map(np.asarray, stats)
  with np.errstate(invalid="ignore", divide="ignore"):
    iou = s["iou_sum"] / s["count"]
    f = s["fscore_sum"] / s["count"]
  seen = s["count"] > 0
  iou0, f0 = np.nan_to_num(iou, nan=0.0), np.nan_to_num(f, nan=0.0)
  return {
      "miou": float(iou0.mean()), "fscore": float(f0.mean()),
      # the original's `*_noBg` drops the *last* class, not background
      "miou_noBg": float(iou0[:-1].mean()), "fscore_noBg": float(f0[:-1].mean()),
      # what its test script logs while running: mean over classes seen
      "miou_seen": float(iou[seen].mean()) if seen.any() else 0.0,
      "fscore_seen": float(f[seen].mean()) if seen.any() else 0.0,
      "miou_per_class": iou0.tolist(), "fscore_per_class": f0.tolist(),
  }
