"""Mask PNGs and overlays (mask over frame), shared by eval and predict."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from avsegformer_jax import files

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def palette(num_classes: int = 71) -> np.ndarray:
  """AVSBench's colour palette ([C, 3] uint8, the PASCAL VOC scheme): bit k
  of (r, g, b) is bit 3k, 3k+1, 3k+2 of the class index, most significant
  colour bit first. The dataset builder decodes label maps with it too."""
  j = np.arange(num_classes)
  pal = np.zeros((num_classes, 3), np.int64)
  for k in range(8):
    for c in range(3):
      pal[:, c] |= ((j >> (3 * k + c)) & 1) << (7 - k)
  return pal.astype(np.uint8)


def denormalise(frames: np.ndarray) -> np.ndarray:
  """ImageNet-normalised float frames [..., 3] -> uint8 RGB."""
  return np.clip((frames * STD + MEAN) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def predict_mask(logits: np.ndarray) -> np.ndarray:
  """logits [..., H, W, C] -> class map [..., H, W] (C = 1: sigmoid > 0.5)."""
  logits = np.asarray(logits, np.float32)
  if logits.shape[-1] == 1:
    return (logits[..., 0] > 0).astype(np.uint8)
  return np.argmax(logits, -1).astype(np.uint8)


def colourise(mask: np.ndarray, num_classes: int) -> np.ndarray:
  """Class map [H, W] -> RGB: white foreground for binary tasks, the
  palette for semantic ones."""
  if num_classes == 1:
    return np.repeat((mask * 255).astype(np.uint8)[..., None], 3, -1)
  return palette(max(num_classes, int(mask.max()) + 1))[mask]


def overlay(frame: np.ndarray, mask: np.ndarray, num_classes: int,
            alpha: float = 0.5) -> np.ndarray:
  """Blend the coloured mask into the frame where the mask is foreground."""
  colour = (np.array([255, 40, 40], np.uint8)[None, None] * np.ones_like(frame)
            if num_classes == 1 else colourise(mask, num_classes))
  fg = (mask > 0)[..., None]
  out = frame.astype(np.float32)
  out = np.where(fg, (1 - alpha) * out + alpha * colour, out)
  return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def save_clip(out_dir: str, clip_id: str, frames: np.ndarray,
              logits: np.ndarray, num_classes: int, valid=None) -> list[str]:
  """Writes <clip>/<t>_mask.png and <t>_overlay.png for each real frame."""
  d = files.join(out_dir, clip_id.replace(os.sep, "_"))
  files.makedirs(d)
  masks = predict_mask(logits)
  rgb = denormalise(frames) if frames.dtype != np.uint8 else frames
  written = []
  for t in range(masks.shape[0]):
    if valid is not None and not valid[t]:
      continue
    m = Image.fromarray(colourise(masks[t], num_classes))
    o = Image.fromarray(overlay(rgb[t], masks[t], num_classes))
    for img, kind in ((m, "mask"), (o, "overlay")):
      path = files.join(d, f"{t}_{kind}.png")
      files.write_png(path, img)
      written.append(path)
  return written
