"""Small videos written with PyAV for the video tests: pictures with a
display matrix, streams that change midway, cover pictures."""
import av
import numpy as np
import pytest

H, W = 48, 80


def stored_picture():
  """A stored (as-encoded) picture whose quarter turns and mirrors all
  differ: red top-left, green top-right, blue bottom-left quarter, grey
  elsewhere."""
  img = np.full((H, W, 3), 128, np.uint8)
  img[:H // 2, :W // 2] = (255, 0, 0)
  img[:H // 2, W // 2:] = (0, 255, 0)
  img[H // 2:, :W // 4] = (0, 0, 255)
  return img


def write_pictures(path, pictures, *, rate=4, display=None, fmt=None,
                   tone=440, audio_rate=16000, pts=None):
  """H.264 of `pictures` + AAC of a tone as long; `display` = (degrees
  counter-clockwise, hflip, vflip) for the display matrix; `pts` in 1/rate
  units (default 0, 1, 2, ...; gaps make a variable frame rate)."""
  with av.open(str(path), "w", format=fmt) as c:
    v = c.add_stream("libx264", rate=rate)
    v.height, v.width = pictures[0].shape[:2]
    v.pix_fmt = "yuv420p"
    if display is not None:
      v.set_display_rotation(display[0], hflip=display[1], vflip=display[2])
    a = c.add_stream("aac", rate=audio_rate, layout="mono")
    pts = list(range(len(pictures))) if pts is None else list(pts)
    for i, img in enumerate(pictures):
      f = av.VideoFrame.from_ndarray(img, format="rgb24")
      f.pts = pts[i]
      c.mux(v.encode(f))
    c.mux(v.encode(None))
    n = int((pts[-1] + 1) / rate * audio_rate)
    f = av.AudioFrame.from_ndarray(
        (0.3 * np.sin(2 * np.pi * tone * np.arange(n) / audio_rate))[None]
        .astype(np.float32), format="fltp", layout="mono")
    f.sample_rate, f.pts = audio_rate, 0
    c.mux(a.encode(f))
    c.mux(a.encode(None))
  return str(path)


needs_display_writer = pytest.mark.skipif(
    not hasattr(av.video.stream.VideoStream, "set_display_rotation"),
    reason="writing a display matrix needs PyAV >= 18")


def with_cover(path, *, video: bool):
  """A cover picture (mjpeg, 1 frame; attached_pic where the muxer keeps
  that: mp4) as the first stream, then H.264 (if `video`) and AAC."""
  with av.open(str(path), "w") as c:
    cover = c.add_stream("mjpeg", rate=1)
    cover.width = cover.height = 32
    cover.pix_fmt = "yuvj420p"
    if hasattr(av.stream, "Disposition"):
      cover.disposition = av.stream.Disposition.attached_pic
    v = c.add_stream("libx264", rate=4) if video else None
    if v is not None:
      v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
    a = c.add_stream("aac", rate=16000, layout="mono")
    f = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 255, np.uint8),
                                   format="rgb24")
    f.pts = 0
    c.mux(cover.encode(f))
    c.mux(cover.encode(None))
    for i in range(12 if v is not None else 0):
      f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 40, np.uint8),
                                     format="rgb24")
      f.pts = i
      c.mux(v.encode(f))
    if v is not None:
      c.mux(v.encode(None))
    f = av.AudioFrame.from_ndarray(np.zeros((1, 48000), np.float32),
                                   format="fltp", layout="mono")
    f.sample_rate, f.pts = 16000, 0
    c.mux(a.encode(f))
    c.mux(a.encode(None))
  return str(path)


def peak_hz(x, sr=16000):
  """The strongest frequency of a 16 kHz signal (Hann-windowed)."""
  spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
  return np.argmax(spec) * sr / len(x)
