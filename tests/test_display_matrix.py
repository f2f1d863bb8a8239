"""display_matrix: frames come as players show them, for every orientation
a display matrix can hold (through video_io, as predict reads them)."""
import numpy as np
import pytest

from avsegformer_jax import display_matrix, video_io
import videos

_ONE, _W_ONE = 1 << 16, 1 << 30     # 1.0 in 16.16 and in 2.30


@pytest.mark.parametrize("m, want", [
    ([_ONE, 0, 0, 0, _ONE, 0, 0, 0, _W_ONE], ()),                 # identity
    ([0, -_ONE, 0, _ONE, 0, 0, 0, 0, _W_ONE], ("transpose=cclock",)),
    ([0, _ONE, 0, -_ONE, 0, 0, 0, 0, _W_ONE], ("transpose=clock",)),
    ([-_ONE, 0, 0, 0, -_ONE, 0, 0, 0, _W_ONE], ("hflip", "vflip")),
    # Singular: no angle; ffmpeg then only looks at the vertical scale.
    ([0] * 9, ()),
    ([0, 0, 0, 0, -_ONE, 0, 0, 0, _W_ONE], ("vflip",)),
    ([1, 2, 3], ()),                                              # not 3 x 3
])
def test_matrix_filters(m, want):
  assert display_matrix.matrix_filters(np.asarray(m, np.int32)) == want


@videos.needs_display_writer
@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
@pytest.mark.parametrize("hflip", [False, True])
def test_frames_are_upright(tmp_path, degrees, hflip):
  """The eight orientations a display matrix can hold (a portrait phone
  video is stored landscape with a quarter turn): frames come as displayed.
  The truth is PyAV's definition of the matrix it writes (turn the stored
  picture `degrees` counter-clockwise, then mirror); ours reads the matrix
  the way the ffmpeg command line picks its filters (video_io.orientation)."""
  stored = videos.stored_picture()
  path = videos.write_pictures(tmp_path / "v.mp4", [stored] * 8,
                display=(degrees, hflip, False))
  info = video_io.probe(path)
  want = np.rot90(stored, degrees // 90)
  want = want[:, ::-1] if hflip else want
  assert (info.height, info.width) == want.shape[:2]
  samples = list(video_io.sample_frames(info, every_frame=True))
  assert len(samples) == 8
  for s in samples:
    assert s.rgb.shape == want.shape
    assert np.abs(s.rgb.astype(np.int16) - want).mean() < 8, info.orientation


@videos.needs_display_writer
def test_odd_display_angle(tmp_path):
  """Not a quarter turn: rotated in the frame, corners black, size kept
  (ffmpeg's rotate filter)."""
  path = videos.write_pictures(tmp_path / "v.mp4",
                               [videos.stored_picture()] * 4,
                               display=(30, False, False))
  info = video_io.probe(path)
  assert info.orientation == ("rotate=330",)      # clockwise degrees
  rgb = next(video_io.sample_frames(info)).rgb
  assert rgb.shape == (videos.H, videos.W, 3)
  assert (rgb[0, 0] < 10).all() and (rgb[-1, -1] < 10).all()
  # A 30 degree counter-clockwise turn takes the green (top-right) quarter's
  # centre (12, 60) to about (4, 48) around the frame centre (24, 40).
  r, g = rgb[4, 48, 0], rgb[4, 48, 1]
  assert g > 200 and r < 60, rgb[4, 48]
