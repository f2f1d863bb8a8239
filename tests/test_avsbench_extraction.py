"""avsbench_extraction: AVSBench's frame resize and moviepy's 16 kHz audio.

Checked by hand against the real tools (not installed for CI): OpenCV 5.0's
`cv2.resize(frame, (224, 224))` from 1080p, 720p, 480p, 360p, 320 x 240 and
300 x 224 (noise and blurred noise) bit for bit, and +-1 on 0.1-0.2% of the
pixels when enlarging (150 x 100, 60 x 50); moviepy 2.1.2's
`write_audiofile(fps=16000)` (ffmpeg 9.0) of PCM 48 kHz stereo, AAC 44.1 kHz
mono, AAC 48 kHz stereo, Opus 48 kHz stereo and AAC 22.05 kHz mono read with
`video_io.read_audio(..., like_avsbench=True)`: every sample equal. The
OpenCV comparison below runs where cv2 is importable (it passes with 5.0).
"""
import numpy as np
import pytest

from avsegformer_jax import avsbench_extraction as ae


def _bilinear(img, height, width):
  """Plain float bilinear at pixel centres, no antialiasing, edges clamped
  (what cv2's INTER_LINEAR computes before its fixed point)."""
  def taps(src, dst):
    f = (np.arange(dst) + 0.5) * src / dst - 0.5
    f = np.clip(f, 0, src - 1)
    i = np.minimum(np.floor(f).astype(int), src - 2)
    return i, f - i
  y, fy = taps(img.shape[0], height)
  x, fx = taps(img.shape[1], width)
  im = img.astype(np.float64)
  rows = im[:, x] * (1 - fx)[None, :, None] + im[:, x + 1] * fx[None, :, None]
  out = rows[y] * (1 - fy)[:, None, None] + rows[y + 1] * fy[:, None, None]
  return out


@pytest.mark.parametrize("shape", [(1080, 1920), (360, 640), (100, 150),
                                   (224, 300), (37, 53)])
def test_resize_is_bilinear_without_antialias(shape):
  rng = np.random.default_rng(shape[0])
  img = rng.integers(0, 256, shape + (3,), np.uint8)
  got = ae.frame(img)
  assert got.shape == (224, 224, 3) and got.dtype == np.uint8
  # OpenCV's 11-bit weights and its SIMD rounding: within 1 of the float.
  assert np.abs(got - _bilinear(img, 224, 224)).max() <= 1.0 + 1e-9
  # An antialiased resize (PIL's) is far from it on noise: the point.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if shape[0] > 448:
    pil = np.asarray(Image.fromarray(img).resize((224, 224), Image.BILINEAR))
    assert np.abs(pil.astype(int) - got).mean() > 20


def test_resize_keeps_a_224_frame():
  img = np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8)
  np.testing.assert_array_equal(ae.frame(img), img)


def test_resize_matches_opencv_where_installed():
  cv2 = pytest.importorskip("cv2")
  rng = np.random.default_rng(1)
  for shape in ((720, 1280), (480, 854), (240, 320)):
    img = rng.integers(0, 256, shape + (3,), np.uint8)
    np.testing.assert_array_equal(ae.frame(img), cv2.resize(img, (224, 224)))


def test_audio_is_the_nearest_sample_clipped_and_truncated():
  """moviepy: the 44.1 kHz sample at round(44100 t) for t = i / 16000,
  clipped to +-0.99 and truncated to int16; VGGish: the channels' mean."""
  n = 44100
  left = np.arange(n, dtype=np.int64) % 65536 - 32768
  right = np.full(n, 1000)
  wave = ae.wave_16k(np.stack([left, right]).astype(np.int16))
  assert wave.shape == (16000,)
  idx = np.round(44100 * ((1.0 / 16000) * np.arange(16000))).astype(int)
  want_left = np.clip(left[idx], -32440, 32440)   # trunc(0.99 * 32768)
  np.testing.assert_array_equal(wave, (want_left + 1000) / 2 / 32768)
  # Past a minute (worked a minute at a time): the same rule throughout.
  long = np.random.default_rng(0).integers(-32768, 32768, (2, 44100 * 130),
                                           dtype=np.int16)
  idx = np.round(44100 * ((1.0 / 16000) * np.arange(16000 * 130)))
  idx = np.minimum(idx.astype(int), long.shape[1] - 1)
  np.testing.assert_array_equal(
      ae.wave_16k(long),
      np.clip(long[:, idx], -32440, 32440).astype(np.float64).mean(0) / 32768)
  # Aliasing, not filtering: a 12 kHz tone comes out at 16 - 12 = 4 kHz.
  t = np.arange(44100) / 44100
  tone = np.round(8000 * np.sin(2 * np.pi * 12000 * t)).astype(np.int16)
  out = ae.wave_16k(np.stack([tone, tone]))
  spec = np.abs(np.fft.rfft(out * np.hanning(len(out))))
  assert abs(np.argmax(spec) * 16000 / len(out) - 4000) < 5


def test_applies_to_the_tasks_avsbench_made():
  assert ae.applies("s4", "avsbench") and ae.applies("ms3", "avsbench")
  assert not ae.applies("avss", "avsbench")
  assert not ae.applies("s4", "direct")
  with pytest.raises(ValueError, match="extraction must be one of"):
    ae.applies("s4", "moviepy")
