"""A raw video's inputs made as AVSBench's preprocessing made S4 and MS3's.

AVSBench's `preprocess_scripts/preprocess_{s4,ms3}.py` turned each YouTube
clip into the files the models train on, and `predict` replays that on a
user's video, so the released models see what they were trained on:
  * frames: the ffmpeg-decoded RGB frame resized to 224 x 224 by
    `cv2.resize` (INTER_LINEAR: bilinear with no antialiasing, in OpenCV's
    11-bit fixed point), saved as PNG; the training loader then resizes that
    224 x 224 picture to the model's size (PIL bilinear, 512 for S4/MS3).
    A frame resized straight from, say, 1080p to 512 is far sharper.
  * audio: moviepy's `write_audiofile(fps=16000)`: ffmpeg decodes to 44.1
    kHz 16-bit stereo, then the sample nearest each 16 kHz instant is taken
    (no low-pass: what lies above 8 kHz folds into the band), clipped to
    +-0.99 and truncated to int16; VGGish averages the two channels. For
    broadband sound this puts +0.2 to +0.5 into the upper log-mel bands
    against a band-limited resampling.
Neither needs OpenCV or moviepy; the resize is checked against OpenCV in
tests where it is installed.
"""
from __future__ import annotations

import numpy as np

SIZE = 224
DECODE_RATE = 44100          # moviepy's default audio_fps
_COEF_SCALE = 2048           # OpenCV's INTER_RESIZE_COEF_SCALE (11 bits)
CHOICES = ("avsbench", "direct")
TASKS = ("s4", "ms3")        # made by these scripts; AVSS ships its frames


def applies(task: str, choice: str) -> bool:
  """Whether predict takes the inputs as AVSBench did ("avsbench", for the
  tasks its scripts made) or straight from the video ("direct")."""
  if choice not in CHOICES:
    raise ValueError(f"extraction must be one of {CHOICES}, got {choice!r}")
  return choice == "avsbench" and task in TASKS


def _axis(src: int, dst: int):
  """OpenCV's INTER_LINEAR taps along one axis: first source index, and
  the two fixed-point weights (rounded separately, as OpenCV does)."""
  scale = src / dst
  f = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
  i = np.floor(f).astype(np.int64)
  f = (f - i.astype(np.float32)).astype(np.float32)
  low = i < 0
  i[low], f[low] = 0, 0
  high = i >= src - 1
  i[high], f[high] = src - 1, 0
  w0 = np.rint((np.float32(1) - f) * _COEF_SCALE).astype(np.int64)
  w1 = np.rint(f * _COEF_SCALE).astype(np.int64)
  return i, np.minimum(i + 1, src - 1), w0, w1


def cv2_linear_resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
  """`cv2.resize(rgb, (width, height))` for uint8 [H, W, C], in numpy: the
  horizontal pass exact in integers, the vertical as OpenCV's SIMD path
  rounds it (((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16) + 2) >> 2."""
  h, w = rgb.shape[:2]
  if (h, w) == (height, width):
    return np.array(rgb, np.uint8)
  x0, x1, a0, a1 = _axis(w, width)
  y0, y1, b0, b1 = _axis(h, height)
  src = rgb.astype(np.int64)
  rows = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]
  top = (rows[y0] >> 4) * b0[:, None, None] >> 16
  bottom = (rows[y1] >> 4) * b1[:, None, None] >> 16
  return np.clip((top + bottom + 2) >> 2, 0, 255).astype(np.uint8)


def frame(rgb: np.ndarray) -> np.ndarray:
  """The 224 x 224 frame AVSBench's extraction stores for a decoded one."""
  return cv2_linear_resize(rgb, SIZE, SIZE)


def wave_16k(stereo_s16: np.ndarray) -> np.ndarray:
  """[2, N] int16 at 44.1 kHz -> mono float64 at 16 kHz, as moviepy wrote
  the wav and VGGish read it back."""
  n = stereo_s16.shape[1]
  total = int(16000 * (n / DECODE_RATE))
  out = np.empty(total, np.float64)
  for start in range(0, total, 60 * 16000):   # a minute at a time: memory
    t = (1.0 / 16000) * np.arange(start, min(start + 60 * 16000, total))
    idx = np.minimum(np.round(DECODE_RATE * t).astype(np.int64), n - 1)
    # moviepy's int16(32768 * clip(v / 32768, -0.99, 0.99)), in integers:
    # v itself, or +-32440 = trunc(0.99 * 32768) beyond it.
    picked = np.clip(stereo_s16[:, idx], -32440, 32440)
    out[start:start + len(t)] = picked.mean(axis=0, dtype=np.float64) / 32768
  return out
