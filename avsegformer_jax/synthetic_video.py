"""A short synthetic video whose sounding object changes over time, with its
ground truth: the end-to-end check for `predict` (and a demo input).

  python -m avsegformer_jax.synthetic_video OUT.mp4 [--size 128] [--fps 25]

Objects, rendering and class sounds are those of the synthetic AVSBench
(`datasets/avsbench/synthesize.py`), so a model trained on that set (the
demo) knows them. Each object stays in its own quadrant and drifts across it
over the whole video; the soundtrack is a sequence of segments, each the tone
of one object (or silence), so which object should be segmented changes with
the audio alone. The container follows the file name: .mp4 (H.264 + AAC),
.mkv (H.264 + 16-bit PCM), .webm (VP9 + Opus).
"""
from __future__ import annotations

import argparse
import dataclasses
import fractions
import os

import av
import numpy as np

from datasets.avsbench import synthesize

# Which object sounds, in order: (class index or None for silence, seconds).
# Segments are 4 s so that AVSBench-style 1 fps sampling (frame at 15/16 of
# each second, audio examples every 0.96 s) sees at most 0.16 s of a previous
# segment in any example.
DEFAULT_CLASSES = (0, 1, 2)           # circle (300 Hz), square (520 Hz), triangle (900 Hz)
DEFAULT_SCHEDULE = ((0, 4.0), (1, 4.0), (2, 4.0))
CODECS = {".mp4": ("libx264", "aac"), ".mkv": ("libx264", "pcm_s16le"),
          ".webm": ("libvpx-vp9", "libopus")}


@dataclasses.dataclass
class SyntheticVideo:
  """Ground truth of a written video; times in seconds from its start."""
  path: str
  fps: int
  size: int
  duration: float
  num_frames: int
  sample_rate: int
  clip: dict                # synthesize's clip dict (objects, rendering)
  schedule: tuple           # ((cls or None, seconds), ...)

  @property
  def classes(self) -> list[int]:
    return [o["cls"] for o in self.clip["objects"]]

  def sounding(self, t: float):
    """Class sounding at time t (None: silence)."""
    end = 0.0
    for cls, seconds in self.schedule:
      end += seconds
      if t < end:
        return cls
    return self.schedule[-1][0]

  def frame_index(self, t: float) -> int:
    return min(int(np.floor(t * self.fps + 1e-6)), self.num_frames - 1)

  def object_masks(self, frame: int) -> dict[int, np.ndarray]:
    """class -> [H, W] bool mask of that object in video frame `frame`."""
    return {o["cls"]: synthesize.object_mask(o, frame, self.size, self.size)
            for o in self.clip["objects"]}


def _plan(rng, classes, num_frames, size) -> dict:
  objects = synthesize._objects(rng, len(classes), num_frames, size, size)  # pylint: disable=protected-access
  for obj, cls in zip(objects, classes):
    obj["cls"] = int(cls)
  return {"objects": objects, "height": size, "width": size,
          "brightness": 1.0, "sounding": []}


def _soundtrack(rng, schedule, sample_rate, channels) -> np.ndarray:
  """[L, C] float in [-1, 1]: the segments' class tones, back to back."""
  parts = []
  for cls, seconds in schedule:
    seg = {"sample_rate": sample_rate, "duration": float(seconds),
           "sounding": [] if cls is None else [int(cls)], "channels": channels}
    y = synthesize._audio(rng, seg)  # pylint: disable=protected-access
    parts.append(y.reshape(len(y), -1))
  return np.concatenate(parts).astype(np.float32)


def write(path, *, classes=DEFAULT_CLASSES, schedule=DEFAULT_SCHEDULE,
          size: int = 128, fps: int = 25, sample_rate: int = 44100,
          channels: int = 2, seed: int = 0,
          with_audio: bool = True) -> SyntheticVideo:
  """Writes the video (container from the extension) and returns its truth.

  `with_audio=False` writes no audio track (to test that error).
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in CODECS:
    raise ValueError(f"{path}: extension must be one of {sorted(CODECS)}")
  if size % 2:
    raise ValueError(f"size must be even (4:2:0 video), got {size}")
  missing = set(c for c, _ in schedule if c is not None) - set(classes)
  if missing:
    raise ValueError(f"schedule sounds classes {sorted(missing)} not shown")
  duration = float(sum(s for _, s in schedule))
  num_frames = int(round(duration * fps))
  rng = np.random.default_rng(seed)
  clip = _plan(rng, classes, num_frames, size)
  texture = synthesize._texture(rng, size, size)  # pylint: disable=protected-access
  vcodec, acodec = CODECS[ext]
  if ext == ".webm":
    sample_rate = 48000                       # Opus only runs at 48 kHz
  sound = _soundtrack(rng, schedule, sample_rate, channels)
  layout = "stereo" if channels == 2 else "mono"
  with av.open(path, "w") as out:
    vs = out.add_stream(vcodec, rate=fps)
    vs.width = vs.height = size
    vs.pix_fmt = "yuv420p"
    vs.options = ({"crf": "12"} if vcodec == "libx264" else
                  {"crf": "20", "b": "0", "deadline": "realtime", "cpu-used": "8"})
    if with_audio:
      aus = out.add_stream(acodec, rate=sample_rate, layout=layout)
      aus.time_base = fractions.Fraction(1, sample_rate)
    fmt = "s16" if acodec == "pcm_s16le" else "fltp"
    written = 0
    for i in range(num_frames):
      img = synthesize._render(rng, clip, i, texture)  # pylint: disable=protected-access
      frame = av.VideoFrame.from_ndarray(img, format="rgb24")
      frame.pts = i
      out.mux(vs.encode(frame))
      # Interleave: audio up to the end of this frame.
      upto = min(len(sound), int(round((i + 1) / fps * sample_rate)))
      if with_audio and upto > written:
        chunk = sound[written:upto].T                      # [C, n]
        if fmt == "s16":
          chunk = np.round(chunk * 32767).astype(np.int16).T.reshape(1, -1)
        af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk),
                                        format=fmt, layout=layout)
        af.sample_rate, af.pts = sample_rate, written
        out.mux(aus.encode(af))
        written = upto
    out.mux(vs.encode(None))
    if with_audio:
      out.mux(aus.encode(None))
  return SyntheticVideo(path, fps, size, duration, num_frames, sample_rate,
                        clip, tuple(schedule))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("out", help="output file: .mp4, .mkv or .webm")
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--fps", type=int, default=25)
  p.add_argument("--seed", type=int, default=0)
  a = p.parse_args(argv)
  v = write(a.out, size=a.size, fps=a.fps, seed=a.seed)
  names = [synthesize.CLASSES[c][0] for c in v.classes]
  plan = ", ".join(f"{'silence' if c is None else synthesize.CLASSES[c][0]} "
                   f"{s:g} s" for c, s in v.schedule)
  print(f"wrote {v.path}: {v.duration:g} s, {v.num_frames} frames of "
        f"{v.size}px, objects {names}; sounds: {plan}")


if __name__ == "__main__":
  main()
