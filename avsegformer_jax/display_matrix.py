"""Display matrices: how a decoded frame is turned to be shown upright.

A phone video shot in portrait is stored landscape with a quarter turn in
its display matrix (front cameras add a mirror); players apply it. `filters`
reads the matrix a frame carries and picks the ffmpeg filters the ffmpeg
command line's autorotation would insert (fftools' choice, ported), and
`apply` runs them on an RGB array, so frames reach the model as a viewer
(and AVSBench's ffmpeg-based frame extraction) sees them.
"""
import math

import av
import numpy as np
from PIL import Image


def _c_round(x: float) -> float:
  """C's round(): halves away from zero."""
  return math.copysign(math.floor(abs(x) + 0.5), x)


def filters(frame: av.VideoFrame) -> tuple[str, ...]:
  """The ffmpeg filters that show `frame` upright, chosen from its display
  matrix exactly as the ffmpeg command line's autorotation chooses them
  (`transpose=clock|cclock|clock_flip|cclock_flip`, `hflip`, `vflip`, or
  `rotate=DEG` clockwise for an angle that is not a quarter turn)."""
  sd = frame.side_data.get(av.sidedata.sidedata.Type.DISPLAYMATRIX)
  if sd is None:
    return ()
  return matrix_filters(np.frombuffer(bytes(sd), np.int32))


def matrix_filters(m: np.ndarray) -> tuple[str, ...]:
  """`filters` of a display matrix: 9 int32, row-major, 16.16 fixed point
  (2.30 in the last column), as libavutil/display.h lays it out."""
  if m.size != 9:
    return ()
  a, b, c, d = (float(m[i]) / 65536.0 for i in (0, 1, 3, 4))
  s0, s1 = math.hypot(a, c), math.hypot(b, d)
  theta = math.nan                             # a singular matrix
  if s0 and s1:  # clockwise degrees in [0, 360), as ffmpeg's get_rotation
    theta = _c_round(math.degrees(math.atan2(b / s1, a / s0)))
    theta -= 360 * math.floor(theta / 360 + 0.9 / 360)
  if abs(theta - 90) < 1:
    return ("transpose=cclock_flip" if m[3] > 0 else "transpose=clock",)
  if abs(theta - 180) < 1:
    return ("hflip",) * bool(m[0] < 0) + ("vflip",) * bool(m[4] < 0)
  if abs(theta - 270) < 1:
    return ("transpose=clock_flip" if m[3] < 0 else "transpose=cclock",)
  if abs(theta) > 1:
    return (f"rotate={theta:g}",)
  return ("vflip",) if m[4] < 0 else ()


def apply(rgb: np.ndarray, ops: tuple[str, ...]) -> np.ndarray:
  """Applies `filters`' result to an [H, W, C] picture."""
  for op in ops:
    if op == "hflip":
      rgb = rgb[:, ::-1]
    elif op == "vflip":
      rgb = rgb[::-1]
    elif op == "transpose=clock":
      rgb = np.rot90(rgb, -1)
    elif op == "transpose=cclock":
      rgb = np.rot90(rgb, 1)
    elif op == "transpose=cclock_flip":          # the plain transpose
      rgb = rgb.transpose(1, 0, 2)
    elif op == "transpose=clock_flip":           # the anti-transpose
      rgb = rgb[::-1, ::-1].transpose(1, 0, 2)
    elif op.startswith("rotate="):
      # ffmpeg's rotate filter keeps the frame size and fills with black.
      rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).rotate(
          -float(op[7:]), resample=Image.BILINEAR))
  return np.ascontiguousarray(rgb)
