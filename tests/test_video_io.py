"""video_io: which streams are read, how frames are sampled, and the
soundtrack (aligned with the frames, whatever the container says)."""
import fractions

import numpy as np
import pytest

from avsegformer_jax import synthetic_video, video_io
from datasets.avsbench import synthesize
import videos


@pytest.mark.parametrize("fps", [25, 30])
def test_avsbench_sampling(tmp_path, fps):
  """Second l -> decoded frame int(l*F + 15F/16), as AVSBench extracts; a
  trailing partial second >= 0.5 s takes the last frame."""
  v = synthetic_video.write(tmp_path / "v.mkv", size=32, fps=fps,
                            schedule=((0, 2.0), (1, 1.6)))
  info = video_io.probe(v.path)
  got = [s.source_frame for s in video_io.sample_frames(info)]
  want = [int(l * fps + 15 * fps / 16) for l in range(4)]   # 3.6 s -> 4
  want[-1] = min(want[-1], v.num_frames - 1)
  assert got == want


def _frame_on_screen(starts, t):
  return int(np.searchsorted(starts, t + 1e-9, side="right")) - 1


@pytest.mark.parametrize("kind", ["29.97fps", "variable"])
def test_avsbench_sampling_follows_time(tmp_path, kind):
  """Second l gets the frame on screen at l + 15/16 s where AVSBench's frame
  index int(l*F + 15F/16), F = round(rate), would leave the audio: at 29.97
  fps it is 2 frames late after a minute; in a variable-rate video (10 s at
  10 fps, then 10 s at 30 fps: average 20) 4.7 s late from second 5 on."""
  if kind == "29.97fps":
    rate, pts = fractions.Fraction(30000, 1001), list(range(1800))
  else:
    rate, pts = 30, [3 * i for i in range(100)] + list(range(300, 600))
  pictures = [np.zeros((32, 32, 3), np.uint8)] * len(pts)
  path = videos.write_pictures(tmp_path / "v.mp4", pictures, rate=rate,
                               pts=pts)
  info = video_io.probe(path)
  starts = np.asarray(pts) / float(rate)
  got = [s.source_frame for s in video_io.sample_frames(info)]
  seconds = int(round(starts[-1] + 1 / float(rate)))
  want = [_frame_on_screen(starts, l + 15 / 16) for l in range(seconds)]
  assert got == want
  big = round(float(info.rate))
  index_rule = [min(int(l * big + 15 * big / 16), len(pts) - 1)
                for l in range(seconds)]
  assert index_rule != want      # the two rules do part here


def test_centred_and_every_frame_sampling(video):
  info = video_io.probe(video.path)
  s = list(video_io.sample_frames(info, fps=2.0))
  assert len(s) == 24
  assert [x.source_frame for x in s[:4]] == [6, 18, 31, 43]   # floor(t*25)
  np.testing.assert_allclose([x.time for x in s[:3]], [0.25, 0.75, 1.25])
  every = list(video_io.sample_frames(info, every_frame=True))
  assert len(every) == video.num_frames
  np.testing.assert_allclose(every[3].time, 3.5 / 25, atol=1e-6)


def test_containers_decode_alike(tmp_path, video):
  """mkv (PCM) and webm (VP9 + Opus) give the same samples as mp4."""
  ref = [s.rgb.astype(np.int16) for s in
         video_io.sample_frames(video_io.probe(video.path))]
  for ext in (".mkv", ".webm"):
    v = synthetic_video.write(tmp_path / f"v{ext}", size=64)
    info = video_io.probe(v.path)
    got = list(video_io.sample_frames(info))
    assert len(got) == len(ref) == 12, ext
    for a, b in zip(got, ref):
      assert np.abs(a.rgb.astype(np.int16) - b).mean() < 6, ext
    wave = video_io.read_audio(info, 0.975)
    assert abs(len(wave) / 16000 - 12.0) < 0.05, (ext, len(wave))


def test_audio_is_aligned_with_video(video):
  """Each second of the decoded soundtrack (AAC, 44.1 kHz stereo -> 16 kHz
  mono) holds the tone of the object the schedule says sounds then."""
  wave = video_io.read_audio(video_io.probe(video.path), 0.975)
  for sec in range(12):
    x = wave[int((sec + 0.1) * 16000):int((sec + 0.9) * 16000)]
    tone = synthesize.CLASSES[video.sounding(sec + 0.5)][2]
    assert abs(videos.peak_hz(x) - tone) < 0.05 * tone, sec


def test_audio_read_whatever_the_stated_duration(video):
  """The soundtrack buffer is sized from the container's duration; one that
  states too little (or none) only makes it grow."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  info = video_io.probe(video.path)
  want = video_io.read_audio(info, 0.975)
  for duration in (0.5, None):
    got = video_io.read_audio(dataclasses.replace(info, duration=duration),
                              0.975)
    np.testing.assert_array_equal(got, want)


def test_video_track_is_the_one_ffmpeg_plays(tmp_path):
  """An mkv whose first track is a one-frame picture: the H.264 track is
  sampled (ffmpeg's best stream), not the picture."""
  info = video_io.probe(videos.with_cover(tmp_path / "v.mkv", video=True))
  assert (info.width, info.height, info.video_stream) == (64, 48, 1)
  frames = list(video_io.sample_frames(info))
  assert [s.rgb.shape for s in frames] == [(48, 64, 3)] * 3


def test_video_names_with_commas_and_brackets(tmp_path):
  """Downloaded videos are often called like this: an existing path is
  taken as it is, not split at its comma or globbed at its brackets."""
  for name in ("Concert [1080p].mp4", "Live, part 2.mkv", "a.mp4"):
    (tmp_path / name).write_bytes(b"")
  concert, live = str(tmp_path / "Concert [1080p].mp4"), str(
      tmp_path / "Live, part 2.mkv")
  assert video_io.expand_videos(concert) == [concert]
  assert video_io.expand_videos(live) == [live]
  assert video_io.expand_videos(f"{concert},{tmp_path / '*.mp4'}") == [
      concert, str(tmp_path / "a.mp4")]


def _surround(path, seconds=2, rate=48000):
  """8 black frames and 5.1 PCM: 440 Hz in the front left and right (0.2),
  300 Hz in the centre (0.2, where films put speech), a loud 60 Hz LFE
  rumble (0.9), silent surrounds."""
  import av  # pylint: disable=g-import-not-at-top
  t = np.arange(seconds * rate) / rate
  front = 0.2 * np.sin(2 * np.pi * 440 * t)
  centre = 0.2 * np.sin(2 * np.pi * 300 * t)
  lfe = 0.9 * np.sin(2 * np.pi * 60 * t)
  silent = np.zeros_like(t)
  with av.open(str(path), "w") as c:
    v = c.add_stream("libx264", rate=4)
    v.height = v.width = 32
    v.pix_fmt = "yuv420p"
    a = c.add_stream("pcm_s16le", rate=rate, layout="5.1")
    for i in range(4 * seconds):
      f = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8),
                                     format="rgb24")
      f.pts = i
      c.mux(v.encode(f))
    c.mux(v.encode(None))
    f = av.AudioFrame.from_ndarray(            # 5.1: FL FR FC LFE BL BR
        np.stack([front, front, centre, lfe, silent, silent]).astype(
            np.float32), format="fltp", layout="5.1")
    f.sample_rate, f.pts = rate, 0
    c.mux(a.encode(f))
    c.mux(a.encode(None))
  return str(path)


def _levels(wave, hz_list):
  """Spectrum magnitude at each frequency of a 16 kHz wave's 1.5 s."""
  spectrum = np.abs(np.fft.rfft(wave[4000:28000]))
  hz = np.fft.rfftfreq(24000, 1 / 16000)
  return [spectrum[np.abs(hz - f) < 3].max() for f in hz_list]


def test_surround_sound_is_downmixed_as_ffmpeg_does(tmp_path):
  """5.1 audio: mixed to stereo as ffmpeg does (front channels, centre and
  surrounds; the LFE left out) before L and R are averaged, on both paths.
  A plain mean of the six channels let the loud LFE rumble drown the front
  speakers; the overlay video's soundtrack took FL and FR alone, without
  the centre."""
  path = _surround(tmp_path / "surround.mkv")
  info = video_io.probe(path)
  assert info.audio_channels == 6
  for like_avsbench in (False, True):
    wave = video_io.read_audio(info, 0.975, like_avsbench)
    front, centre, lfe = _levels(wave, (440, 300, 60))
    assert abs(videos.peak_hz(wave[4000:28000]) - 440) < 5, like_avsbench
    assert 0.5 < centre / front < 0.9, (like_avsbench, centre / front)
    assert lfe < 0.01 * front, (like_avsbench, lfe / front)
  w = video_io.OverlayWriter(tmp_path / "o.mp4", info, fractions.Fraction(4))
  for s in video_io.sample_frames(info, 4.0, True):
    w.add(s.rgb)
  w.close()
  out = video_io.read_audio(video_io.probe(str(tmp_path / "o.mp4")), 0.975)
  front, centre, lfe = _levels(out, (440, 300, 60))
  assert 0.5 < centre / front < 0.9 and lfe < 0.01 * front, (centre, lfe)
