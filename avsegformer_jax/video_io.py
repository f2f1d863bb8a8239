"""Video in and out for `predict`, through PyAV (its wheels carry ffmpeg).

Reading: `probe` checks the file, `read_audio` gives the soundtrack as mono
16 kHz aligned to the first video frame, `sample_frames` streams the frames
the model sees. Two samplings:
  * AVSBench (`fps=1`): second l gets the frame on screen at l + 15/16 s:
    at a constant integer rate F that is frame int(l*F + 15*F/16), exactly
    what AVSBench's `preprocess_scripts/preprocess_s4.py` extracts (the last
    of 16 samples per second, clamped to the last frame), and by time it
    stays with the audio where that frame index would drift (29.97 fps read
    as 30: 0.06 s a minute) or jump (variable-rate phone videos); a trailing
    partial second counts when it is at least half a second long.
  * centred (`fps=r`, r != 1): sample k is the frame on screen at
    t_k = (k + 0.5) / r; `every_frame`: every decoded frame, at the middle of
    its display interval.
Frames come upright (`display_matrix`), from the video and audio streams
ffmpeg would play.
Writing: `OverlayWriter` encodes H.264 (4:2:0, so odd sizes are padded by one
pixel) and re-encodes the original audio to AAC beside it, interleaved.
"""
from __future__ import annotations

import dataclasses
import fractions
import glob
import math
import os
from typing import Iterator

import av
import numpy as np
from PIL import Image

from avsegformer_jax import audio as audio_lib
from avsegformer_jax import avsbench_extraction, display_matrix
from avsegformer_jax import errors


class VideoError(errors.InputError):
  """A video file predict cannot use; the message names the file."""


@dataclasses.dataclass(frozen=True)
class VideoInfo:
  path: str
  width: int                 # as displayed (after the display matrix)
  height: int
  rate: fractions.Fraction   # average frame rate
  duration: float | None     # seconds, from the container (None: unknown)
  start: float               # first video timestamp, seconds
  audio_rate: int
  audio_channels: int
  orientation: tuple[str, ...]  # ffmpeg filters that make the frames upright
  video_stream: int             # container stream indices
  audio_stream: int


VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".flv",
                  ".wmv", ".mpg", ".mpeg", ".ts", ".3gp", ".ogv")


def expand_videos(spec: str) -> list[str]:
  """`--video`: files, directories (their videos) and glob patterns, comma
  separated, in that order, each group sorted. A path that exists is taken
  as it is, whatever commas or glob characters its name has ("Concert
  [1080p].mp4")."""
  out = []
  parts = [spec] if os.path.exists(spec) else spec.split(",")
  for part in filter(None, (p.strip() for p in parts)):
    if os.path.isdir(part):
      found = sorted(os.path.join(part, n) for n in os.listdir(part)
                     if n.lower().endswith(VIDEO_SUFFIXES))
    elif glob.has_magic(part) and not os.path.exists(part):
      found = sorted(glob.glob(part))
    else:
      found = [part]                 # a missing one is reported as such
    if not found:
      raise VideoError(f"{part}: no videos ({', '.join(VIDEO_SUFFIXES)})")
    out += [f for f in found if f not in out]
  if not out:
    raise VideoError("--video names no video")
  return out


def _open(path):
  try:
    return av.open(path)
  except av.error.FFmpegError as e:
    raise VideoError(f"{path}: not a readable video file ({e})") from None


def probe(path) -> VideoInfo:
  """Checks that `path` is a video with a video and an audio stream."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VideoError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise VideoError(f"{path}: not a regular file")
  if os.path.getsize(path) == 0:
    raise VideoError(f"{path}: empty file (0 bytes)")
  with _open(path) as c:
    v = _pick(c, "video")
    if v is None:
      covers = len(c.streams.video)
      raise VideoError(f"{path}: no video stream (streams: "
                       f"{[s.type for s in c.streams] or 'none'}"
                       + ("; the video ones are cover pictures" if covers
                          else "") + ")")
    a = _pick(c, "audio")
    if a is None:
      raise VideoError(f"{path}: no audio track; AVSegFormer segments what "
                       "is heard, so it needs the video's sound")
    rate = v.average_rate or v.guessed_rate or v.base_rate
    if not rate or rate <= 0:
      raise VideoError(f"{path}: the video stream has no frame rate")
    duration = None
    if v.duration and v.time_base:
      duration = float(v.duration * v.time_base)
    elif c.duration:
      duration = c.duration / av.time_base
    start = float(v.start_time * v.time_base) if v.start_time is not None \
        and v.time_base else 0.0
    if not a.sample_rate or not a.channels:
      raise VideoError(f"{path}: the audio track has no sample rate/channels")
    # The first frame gives the displayed size: the display matrix rides on
    # the decoded frames (PyAV 14 cannot read it from the stream).
    try:
      first = next(c.decode(v), None)
    except av.error.FFmpegError as e:
      raise VideoError(f"{path}: cannot decode video frame 0 ({e})") from None
    if first is None:
      raise VideoError(f"{path}: the video stream has no frames")
    ops = display_matrix.filters(first)
    width, height = first.width, first.height
    if any(op.startswith("transpose") for op in ops):   # a quarter turn
      width, height = height, width
    return VideoInfo(path, width, height, fractions.Fraction(rate), duration,
                     start, int(a.sample_rate), int(a.channels), ops,
                     v.index, a.index)


_ATTACHED_PIC = 1024   # AV_DISPOSITION_ATTACHED_PIC (PyAV 14 has no enum)


def _pick(c, kind: str):
  """The stream ffmpeg would play (`av_find_best_stream`: with several video
  tracks, not simply the first), never a cover picture; None if none."""
  streams = [s for s in getattr(c.streams, kind)
             if s.codec_context is not None
             and not int(getattr(s, "disposition", 0)) & _ATTACHED_PIC]
  best = c.streams.best(kind)
  for s in streams:
    if best is not None and s.index == best.index:
      return s
  return streams[0] if streams else None


def _rgb(frame: av.VideoFrame) -> np.ndarray:
  """The decoded frame as displayed, [H, W, 3] uint8."""
  return display_matrix.apply(frame.to_ndarray(format="rgb24"),
                              display_matrix.filters(frame))


def _audio_chunks(info: VideoInfo, rate: int | None = None,
                  layout=None) -> Iterator[tuple[float, np.ndarray]]:
  """(start time s, float32 [C, n] at `rate`, default the stream's) per
  decoded audio frame (NaN time for a resampler's flushed tail).

  Converted to `layout` (default the first frame's): a stream whose rate or
  layout changes midway (concatenated recordings) too, through one
  resampler per input setup, since PyAV's passes every frame through
  untouched once the first one matched, whatever later ones are.
  """
  with _open(info.path) as c:
    stream = c.streams[info.audio_stream]
    resampler, setup = None, None
    try:
      for frame in c.decode(stream):
        key = (frame.format.name, frame.layout.name, frame.sample_rate)
        if key != setup:
          if resampler is not None:           # the old setup's tail
            for f in resampler.resample(None):
              yield math.nan, f.to_ndarray()
          layout = layout or frame.layout
          resampler, setup = av.AudioResampler(
              "fltp", layout, rate or info.audio_rate), key
        t = frame.time
        for f in resampler.resample(frame):
          yield (t if t is not None else math.nan), f.to_ndarray()
          t = None
      if resampler is not None:
        for f in resampler.resample(None):
          yield math.nan, f.to_ndarray()
    except av.error.FFmpegError as e:
      raise VideoError(f"{info.path}: cannot decode the audio track ({e})") \
          from None


def read_audio(info: VideoInfo, min_duration: float,
               like_avsbench: bool = False) -> np.ndarray:
  """Mono 16 kHz float64 [L], sample 0 at the first video frame's time
  (leading audio dropped, late-starting audio preceded by silence).
  `like_avsbench`: decoded and taken to 16 kHz as AVSBench's extraction did
  (44.1 kHz 16-bit stereo first: avsbench_extraction); otherwise mixed to
  mono at the source rate and resampled band-limited."""
  if like_avsbench:
    rate, channels, dtype = avsbench_extraction.DECODE_RATE, 2, np.int16
    chunks = _audio_chunks(info, rate=rate, layout="stereo")
  else:
    # Surround sound is taken to stereo as ffmpeg downmixes it (LFE left
    # out), as AVSBench's wavs were, before L and R are averaged.
    rate, channels, dtype = info.audio_rate, 1, np.float32
    chunks = _audio_chunks(
        info, layout="stereo" if info.audio_channels > 2 else None)
  # One buffer sized from the container's duration (grown if that was
  # short): an hour's float32 soundtrack is 0.7 GB at 48 kHz, not twice that.
  size = int(((info.duration or 10.0) + 1.0) * rate)
  buf, n, first = np.empty((channels, size), dtype), 0, None
  bad, first_bad = 0, 0
  for t, x in chunks:
    if first is None:
      first = t if math.isfinite(t) else info.start
    broken = ~np.isfinite(x).all(axis=0)   # float codecs can carry NaN/inf
    if broken.any():
      first_bad = first_bad if bad else n + int(np.argmax(broken))
      bad += int(broken.sum())
      x = np.nan_to_num(x)
    if n + x.shape[1] > buf.shape[1]:
      grown = np.empty((channels, max(2 * buf.shape[1], n + x.shape[1])),
                       dtype)
      grown[:, :n] = buf[:, :n]
      buf = grown
    # As swresample converts to 16 bits (lrintf(x * 2^15), clipped).
    buf[:, n:n + x.shape[1]] = (
        np.clip(np.rint(x * 32768), -32768, 32767) if like_avsbench
        else x.mean(axis=0))
    n += x.shape[1]
  if n == 0:
    raise VideoError(f"{info.path}: the audio track holds no samples")
  if bad:
    raise VideoError(
        f"{info.path}: the audio track holds {bad} NaN or infinite samples "
        f"(the first {first_bad / rate:.3f} s into it); re-encode its audio")
  if n / rate < min_duration:
    raise VideoError(
        f"{info.path}: audio is {n / rate:.3f} s long; one 0.96 s VGGish "
        f"example needs at least {min_duration:.3f} s")
  wave = (avsbench_extraction.wave_16k(buf[:, :n]) if like_avsbench else
          audio_lib.mono_to_16k_in_pieces(buf[0, :n], rate))
  del buf
  shift = int(round((first - info.start) * audio_lib.SAMPLE_RATE))
  if shift > 0:
    wave = np.concatenate([np.zeros(shift), wave])
  elif shift < 0:
    wave = wave[-shift:]
  return wave


@dataclasses.dataclass(frozen=True)
class Sample:
  index: int          # position among the sampled frames
  time: float         # seconds from the first video frame (the sample moment)
  source_frame: int   # decoded frame number
  rgb: np.ndarray     # [H, W, 3] uint8


def avsbench_mode(fps: float, every_frame: bool) -> bool:
  return not every_frame and fps == 1


def sample_frames(info: VideoInfo, fps: float = 1.0,
                  every_frame: bool = False) -> Iterator[Sample]:
  """Streams the sampled frames (see the module docstring for the rules)."""
  if not every_frame and not fps > 0:
    raise ValueError(f"fps must be > 0, got {fps}")
  step = 1.0 / float(info.rate)
  avsbench = avsbench_mode(fps, every_frame)

  def target(k):  # the moment sample k shows
    return k + 15 / 16 if avsbench else (k + 0.5) / fps

  k, prev, n = 0, None, 0
  with _open(info.path) as c:
    stream = c.streams[info.video_stream]
    stream.thread_type = "AUTO"
    try:
      for i, frame in enumerate(c.decode(stream)):
        t = (frame.time - info.start) if frame.time is not None else i * step
        n = i + 1
        if every_frame:
          yield Sample(i, t + step / 2, i, _rgb(frame))
          continue
        # The previous frame is the one on screen at every target before t.
        while prev is not None and t > target(k) + 1e-6:
          yield Sample(k, prev[1] if avsbench else target(k), prev[0],
                       _rgb(prev[2]))
          k += 1
        prev = (i, t, frame)
    except av.error.FFmpegError as e:
      raise VideoError(f"{info.path}: cannot decode video frame {n} ({e})") \
          from None
    if n == 0:
      raise VideoError(f"{info.path}: the video stream has no frames")
    if every_frame:
      return
    end = prev[1] + step                               # end of the last frame
    rgb = _rgb(prev[2])
    if avsbench:   # a last partial second >= 0.5 s counts; the frame clamps
      for k in range(k, max(1, int(math.floor(end + 0.5 + 1e-6)))):
        yield Sample(k, prev[1], prev[0], rgb)
    else:
      while target(k) < end:
        yield Sample(k, target(k), prev[0], rgb)
        k += 1


class OverlayWriter:
  """H.264 video of RGB frames at `rate`, with the source's audio as AAC.

  `timed`: each frame is shown at the time `add` is given (every decoded
  frame of a variable-rate video keeps its own moment, and so its sync with
  the sound); otherwise frames follow each other at `rate`.
  """

  _TIMED_BASE = fractions.Fraction(1, 90000)

  def __init__(self, path, info: VideoInfo, rate: fractions.Fraction,
               timed: bool = False):
    self.path, self.info = os.fspath(path), info
    self.width, self.height = info.width + info.width % 2, \
        info.height + info.height % 2
    self.out = av.open(self.path, "w")
    self.video = self.out.add_stream("libx264", rate=rate)
    self.timed, self._pts = timed, -1
    if timed:
      self.video.codec_context.time_base = self._TIMED_BASE
      self.video.time_base = self._TIMED_BASE
    self.video.width, self.video.height = self.width, self.height
    self.video.pix_fmt = "yuv420p"
    # veryfast: at 1080p on 2 cores 43 ms a frame against the default
    # preset's 126 (medium), at the same quality setting (crf) and within
    # +-20% in size on the two contents tried; with --every_frame the
    # encoder had become predict's largest host cost.
    self.video.options = {"crf": "18", "preset": "veryfast"}
    self.rate = rate
    layout = "mono" if info.audio_channels == 1 else "stereo"
    self.audio = self.out.add_stream("aac", rate=info.audio_rate, layout=layout)
    self.layout = layout
    # Surround taken to stereo as ffmpeg downmixes it (the centre, where
    # films put speech, included; the LFE left out).
    self._chunks = _audio_chunks(
        info, layout="stereo" if info.audio_channels > 2 else None)
    self._skip = 0
    self._written = 0          # output audio samples so far
    self._first = None
    self.frames = 0

  def _push_audio(self, until: float | None):
    """Encodes source audio up to output time `until` (None: all of it)."""
    sr = self.info.audio_rate
    while until is None or self._written < until * sr:
      try:
        t, x = next(self._chunks)
      except StopIteration:
        return
      if self._first is None:
        self._first = t if math.isfinite(t) else self.info.start
        lead = int(round((self._first - self.info.start) * sr))
        if lead > 0:     # audio starts after the first frame: leading silence
          x = np.concatenate([np.zeros((x.shape[0], lead), x.dtype), x], 1)
        self._skip = max(0, -lead)   # audio before the first frame: dropped
      drop = min(self._skip, x.shape[1])
      x, self._skip = x[:, drop:], self._skip - drop
      if x.shape[1] == 0:
        continue
      f = av.AudioFrame.from_ndarray(np.ascontiguousarray(x, np.float32),
                                     format="fltp", layout=self.layout)
      f.sample_rate, f.pts = sr, self._written
      self._written += x.shape[1]
      self.out.mux(self.audio.encode(f))

  def add(self, rgb: np.ndarray, at: float | None = None):
    """Appends a frame; `at`: its time in seconds (timed writers only)."""
    h, w = rgb.shape[:2]
    if (h, w) != (self.info.height, self.info.width) and (h, w) != (
        self.height, self.width):
      # The stream changed size midway (e.g. a concatenated or adaptive
      # stream): scaled to the first frame's size, as a player window does.
      rgb = np.asarray(Image.fromarray(np.ascontiguousarray(rgb)).resize(
          (self.info.width, self.info.height), Image.BILINEAR))
      h, w = rgb.shape[:2]
    if (h, w) != (self.height, self.width):
      rgb = np.pad(rgb, ((0, self.height - h), (0, self.width - w), (0, 0)),
                   mode="edge")
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    if self.timed:     # strictly increasing, as the encoder needs
      self._pts = max(self._pts + 1, round(at / self._TIMED_BASE))
      frame.pts, frame.time_base = self._pts, self._TIMED_BASE
      until = at
    else:
      frame.pts = self.frames
      until = (self.frames + 1) / float(self.rate)
    self.out.mux(self.video.encode(frame))
    self.frames += 1
    self._push_audio(until + 1.0)

  def abort(self):
    """Closes without flushing (after an error; the file is incomplete)."""
    try:
      self.out.close()
    except av.error.FFmpegError:
      pass
    self._chunks.close()

  def close(self):
    self.out.mux(self.video.encode(None))
    self._push_audio(None)
    self.out.mux(self.audio.encode(None))
    self.out.close()
    self._chunks.close()
