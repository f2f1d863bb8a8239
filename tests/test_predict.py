"""predict: errors, windows and audio examples, outputs (with a stand-in
for the model), and end to end with a small trained model (predict_model).
The video reading itself: test_video_io, test_display_matrix; several
videos, --skip_done and failed writes: test_predict_outputs."""
import json
import logging
import os

import av
import numpy as np
import pytest
from PIL import Image

from avsegformer_jax import (audio, predict, predict_outputs, synthetic_video,
                             video_io)
import videos


from predict_stub import config as _config


# -------------------------------------------------------------- errors --
def _predict(path, out, **kw):
  return predict.predict(_config(), str(path), str(out),
                         variables={"params": {}}, progress=False, **kw)


def test_missing_file(tmp_path):
  with pytest.raises(predict.PredictError, match="nope.mp4: no such file"):
    _predict(tmp_path / "nope.mp4", tmp_path / "out")


def test_not_a_video(tmp_path):
  p = tmp_path / "notes.mp4"
  p.write_text("this is not a video\n" * 50)
  with pytest.raises(predict.PredictError,
                     match="notes.mp4: not a readable video file"):
    _predict(p, tmp_path / "out")


def test_truncated_file(tmp_path, video):
  with open(video.path, "rb") as f:
    data = f.read()
  p = tmp_path / "cut.mp4"
  p.write_bytes(data[:len(data) * 2 // 5])   # mp4 index (moov) is at the end
  with pytest.raises(predict.PredictError, match="cut.mp4: not a readable"):
    _predict(p, tmp_path / "out")


def test_audio_only_file(tmp_path):
  import soundfile as sf  # pylint: disable=g-import-not-at-top
  p = tmp_path / "sound.wav"
  sf.write(str(p), np.zeros(16000 * 2, np.float32), 16000)
  with pytest.raises(predict.PredictError, match="sound.wav: no video stream"):
    _predict(p, tmp_path / "out")


@pytest.mark.skipif(not hasattr(av.stream, "Disposition"),
                    reason="writing a cover picture needs PyAV >= 15")
def test_song_with_cover_art(tmp_path):
  with pytest.raises(predict.PredictError,
                     match=r"song.mp4: no video stream .*the video ones are "
                     r"cover pictures"):
    _predict(videos.with_cover(tmp_path / "song.mp4", video=False),
             tmp_path / "out")


def test_still_image_has_no_audio(tmp_path):
  p = tmp_path / "frame.png"
  Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p)
  with pytest.raises(predict.PredictError, match="frame.png: no audio track"):
    _predict(p, tmp_path / "out")


def test_no_audio_track(tmp_path):
  v = synthetic_video.write(tmp_path / "mute.mp4", size=32,
                            schedule=((0, 2.0),), with_audio=False)
  with pytest.raises(predict.PredictError, match="mute.mp4: no audio track"):
    _predict(v.path, tmp_path / "out")


def test_shorter_than_one_example(tmp_path):
  v = synthetic_video.write(tmp_path / "short.mkv", size=32,
                            schedule=((0, 0.6),))
  with pytest.raises(predict.PredictError,
                     match=r"short.mkv: audio is 0.6\d* s long"):
    _predict(v.path, tmp_path / "out")


def test_audio_with_nan_samples(tmp_path):
  """PCM float audio can hold NaN; refused by name, not a traceback."""
  with av.open(str(tmp_path / "nan.mkv"), "w") as c:
    v = c.add_stream("libx264", rate=4)
    v.width, v.height, v.pix_fmt = 32, 32, "yuv420p"
    a = c.add_stream("pcm_f32le", rate=16000, layout="mono")
    for i in range(8):
      f = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8),
                                     format="rgb24")
      f.pts = i
      c.mux(v.encode(f))
    c.mux(v.encode(None))
    x = np.zeros((1, 32000), np.float32)
    x[0, 20000:20010] = np.nan
    f = av.AudioFrame.from_ndarray(x, format="flt", layout="mono")
    f.sample_rate, f.pts = 16000, 0
    c.mux(a.encode(f))
    c.mux(a.encode(None))
  with pytest.raises(predict.PredictError,
                     match=r"nan.mkv: the audio track holds 10 NaN or "
                     r"infinite samples \(the first 1.250 s into it\)"):
    _predict(tmp_path / "nan.mkv", tmp_path / "out", extraction="direct")
  # AVSBench's way resamples to 44.1 kHz first, which spreads them.
  with pytest.raises(predict.PredictError,
                     match=r"nan.mkv: the audio track holds \d+ NaN or "
                     r"infinite samples \(the first 1.2\d+ s into it\)"):
    _predict(tmp_path / "nan.mkv", tmp_path / "out")


def test_checkpoint_of_another_config(tmp_path, video):
  with pytest.raises(predict.PredictError,
                     match=r"variables: does not fit the config: \d+ missing "
                     r"\(params/audio_proj/bias, .*Pass the config it was "
                     r"trained with"):
    _predict(video.path, tmp_path / "out")


def test_checkpoint_made_with_another_resolution(tmp_path, video, stub_model,
                                                caplog):
  """A model whose run had another image size (or task, or window) fits the
  variables all the same and gives other masks: predict says so, in the log
  and in predictions.json."""
  from avsegformer_jax import checkpoint  # pylint: disable=g-import-not-at-top
  made = _config()
  made.data.image_size = 96
  export = tmp_path / "export"
  checkpoint.save_variables(export, {"params": {"w": np.zeros(2, np.float32)}},
                            config=made)
  with caplog.at_level(logging.WARNING):
    s = predict.predict(_config(), video.path, str(tmp_path / "out"),
                        checkpoint_dir=str(export), progress=False)
  assert s["checkpoint_made_with"] == {"data.image_size": [96, 64]}
  assert (f"{export} was made with data.image_size=96; this config has "
          f"data.image_size=64.") in caplog.text
  s = predict.predict(made, video.path, str(tmp_path / "out"),
                      checkpoint_dir=str(export), progress=False)
  assert "checkpoint_made_with" not in s


def test_cli_error_is_one_line(tmp_path):
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  r = subprocess.run(
      [sys.executable, "-m", "avsegformer_jax.predict",
       "--config=configs/demo.py", f"--checkpoint={tmp_path}",
       f"--video={tmp_path / 'missing.webm'}", f"--out={tmp_path / 'o'}"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2
  assert "predict: error:" in r.stderr and "missing.webm: no such file" in r.stderr
  assert "Traceback" not in r.stderr
  # Several videos: each one that cannot be used is skipped and named, the
  # run ends with status 1 and a one-line count.
  r = subprocess.run(
      [sys.executable, "-m", "avsegformer_jax.predict",
       "--config=configs/demo.py", f"--checkpoint={tmp_path}",
       f"--video={tmp_path / 'a.webm'},{tmp_path / 'b.mp4'}",
       f"--out={tmp_path / 'o'}"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr
  assert f"skipped {tmp_path / 'b.mp4'}: {tmp_path / 'b.mp4'}: no such file" \
      in r.stdout
  assert r.stderr.strip().endswith(
      f"predict: error: 2 of 2 videos skipped (see above): "
      f"{tmp_path / 'a.webm'}, {tmp_path / 'b.mp4'}")
  assert "Traceback" not in r.stderr
  # Flags that contradict each other: absl's one-line flag error.
  r = subprocess.run(
      [sys.executable, "-m", "avsegformer_jax.predict",
       "--config=configs/demo.py", f"--checkpoint={tmp_path}",
       f"--video={tmp_path / 'a.webm'}", f"--out={tmp_path / 'o'}",
       "--every_frame", "--fps=2"],
      cwd=root, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1
  assert "--fps and --every_frame exclude each other" in r.stderr
  assert "Traceback" not in r.stderr


# ------------------------------------------------------------- outputs --
def _tones(path, seconds):
  """Peak frequency of each second of a file's soundtrack."""
  wave = video_io.read_audio(video_io.probe(path), 0.975)
  return [videos.peak_hz(wave[int((s + 0.1) * 16000):int((s + 0.9) * 16000)])
          for s in range(seconds)]


@pytest.mark.parametrize("batch_clips", [1, 2])
def test_outputs(tmp_path, video, stub_model, batch_clips):
  out = tmp_path / "out"
  s = predict.predict(_config(), video.path, str(out), variables=stub_model,
                      batch_clips=batch_clips, progress=False)
  # 12 sampled frames in windows of 5: the 3 padded frames are dropped.
  assert s["num_frames"] == 12 and s["sampling"] == "avsbench_1fps"
  assert [r["index"] for r in s["frames"]] == list(range(12))
  assert json.loads((out / "predictions.json").read_text())["num_frames"] == 12
  for r in s["frames"]:
    mask = np.asarray(Image.open(out / "masks" / f"{r['index']:05d}.png"))
    over = np.asarray(Image.open(out / "overlays" / f"{r['index']:05d}.png"))
    assert mask.shape == (64, 64) and over.shape == (64, 64, 3)
    # The stub marks red pixels: the circle, at the video's resolution.
    circle = video.object_masks(r["source_frame"])[0]
    iou = ((mask > 127) & circle).sum() / ((mask > 127) | circle).sum()
    assert iou > 0.8, (r, iou)
  with av.open(str(out / "overlay.mp4")) as c:
    vs, aus = c.streams.video[0], c.streams.audio[0]
    assert vs.codec_context.name == "h264" and vs.average_rate == 1
    assert aus.codec_context.name == "aac" and aus.sample_rate == 44100
    assert sum(1 for _ in c.decode(video=0)) == 12
  # The original soundtrack, in sync: each second's tone matches the input's.
  np.testing.assert_allclose(_tones(str(out / "overlay.mp4"), 12),
                             _tones(video.path, 12), rtol=0.02)


def test_avss_outputs(tmp_path, video, stub_model, monkeypatch):
  """AVSS (71 classes): masks are class indices in AVSBench's palette (what
  its own label PNGs use), resized without mixing classes; overlays take
  each class's colour; the audio is zero-padded as AVSS trains."""
  from avsegformer_jax import visualize  # pylint: disable=g-import-not-at-top
  def forward(model, num_classes):
    assert num_classes == 71
    def f(variables, frames, audio, valid):
      red = frames[..., 0] - frames[..., 1] > 2.0             # the circle
      return np.where(red, 7, 0).astype(np.int32)
    return f
  monkeypatch.setattr(predict, "_make_forward", forward)
  pads = []
  real = predict.audio_lib.AudioAligner
  monkeypatch.setattr(predict.audio_lib, "AudioAligner",
                      lambda *a: pads.append(a[3]) or real(*a))
  config = _config()
  config.task, config.model.num_classes = "avss", 71
  out = tmp_path / "out"
  s = predict.predict(config, video.path, str(out), variables=stub_model,
                      progress=False)
  assert pads == ["zero_pad"]
  palette = visualize.palette(256)
  src = {x.index: x.rgb.astype(np.float32)
         for x in video_io.sample_frames(video_io.probe(video.path))}
  for r in s["frames"][:4]:                          # the circle sounds 0-4 s
    img = Image.open(out / "masks" / f"{r['index']:05d}.png")
    assert img.mode == "P"
    np.testing.assert_array_equal(
        np.asarray(img.getpalette()[:3 * 8]).reshape(8, 3), palette[:8])
    mask = np.asarray(img)
    assert set(np.unique(mask)) == {0, 7}
    circle = video.object_masks(r["source_frame"])[0]
    assert ((mask == 7) & circle).sum() / ((mask == 7) | circle).sum() > 0.8
    over = np.asarray(Image.open(out / "overlays" / f"{r['index']:05d}.png"))
    rgb, fg = src[r["index"]], mask == 7
    np.testing.assert_allclose(over[fg], 0.5 * rgb[fg] + 0.5 * palette[7],
                               atol=1)
    np.testing.assert_array_equal(over[~fg], rgb[~fg])


def test_without_overlay_images(tmp_path, video, stub_model):
  """overlay_images=False: masks, the overlay video and predictions.json,
  no per-frame overlay PNGs (~3 MB each at 1080p)."""
  out = tmp_path / "out"
  s = predict.predict(_config(), video.path, str(out), variables=stub_model,
                      progress=False, overlay_images=False)
  assert sorted(p.name for p in out.iterdir()) == [
      "masks", "overlay.mp4", "predictions.json"]
  assert len(list((out / "masks").iterdir())) == s["num_frames"] == 12


@pytest.mark.parametrize("task, extraction, want", [
    ("s4", "avsbench", "avsbench"), ("s4", "direct", "direct"),
    ("avss", "avsbench", "direct")])
def test_extraction(tmp_path, video, monkeypatch, task, extraction, want):
  """S4/MS3 by default: the model sees the frame as AVSBench stored it (cv2
  to 224 x 224, then the loader's resize) and moviepy's 16 kHz audio; AVSS
  (its frames are its own) and extraction="direct": straight from the video."""
  from avsegformer_jax import avsbench_extraction  # pylint: disable=g-import-not-at-top
  seen = []
  def forward(model, num_classes):
    def f(variables, frames, audio, valid):
      seen.append((frames.copy(), audio.copy()))
      return np.zeros(frames.shape[:3], np.int32 if num_classes > 1
                      else np.float32)
    return f
  monkeypatch.setattr(predict, "_make_forward", forward)
  monkeypatch.setattr(predict.checkpoint, "fit_variables", lambda v, *a: v)
  config = _config()
  config.task, config.model.num_classes = task, 1 if task == "s4" else 71
  s = predict.predict(config, video.path, str(tmp_path / "out"),
                      variables={"params": {}}, progress=False,
                      extraction=extraction)
  assert s["extraction"] == want
  info = video_io.probe(video.path)
  first = next(video_io.sample_frames(info)).rgb
  if want == "avsbench":
    first = avsbench_extraction.frame(first)
  np.testing.assert_allclose(seen[0][0][0], predict.preprocess(first, 64),
                             atol=1e-6)
  wave = video_io.read_audio(info, 0.975, like_avsbench=want == "avsbench")
  np.testing.assert_array_equal(
      seen[0][1][0], audio.waveform_to_examples(wave[:5 * 16000], 16000)[0])


def test_every_frame_output_rate(tmp_path, stub_model):
  v = synthetic_video.write(tmp_path / "v.webm", size=32, fps=10,
                            schedule=((0, 1.5), (1, 1.0)))
  s = predict.predict(_config(), v.path, str(tmp_path / "out"),
                      variables=stub_model, every_frame=True, progress=False)
  assert s["num_frames"] == v.num_frames == 25
  with av.open(str(tmp_path / "out" / "overlay.mp4")) as c:
    assert c.streams.video[0].average_rate == 10
    assert sum(1 for _ in c.decode(video=0)) == 25
    assert c.streams.audio[0].sample_rate == 48000


# ------------------------------------------ videos as users have them --
@videos.needs_display_writer
def test_predict_on_a_portrait_video(tmp_path, stub_model):
  """Masks, overlays and the overlay video are upright and of the displayed
  size; predictions.json says what was applied."""
  stored = videos.stored_picture()
  path = videos.write_pictures(tmp_path / "phone.mp4", [stored] * 12,
                               display=(-90, False, False))  # clockwise
  out = tmp_path / "out"
  s = predict.predict(_config(), path, str(out), variables=stub_model,
                      progress=False)
  assert s["size"] == [videos.H, videos.W]
  assert s["orientation"] == ["transpose=clock"]
  assert predict_outputs.summary_line(s, str(out)).endswith(
      "; frames made upright (transpose=clock)")
  red = np.rot90((stored[..., 0] > 200) & (stored[..., 1] < 50), -1)
  for r in s["frames"]:
    mask = np.asarray(Image.open(out / "masks" / f"{r['index']:05d}.png")) > 127
    assert mask.shape == red.shape == (videos.W, videos.H)
    assert (mask & red).sum() / (mask | red).sum() > 0.9
  with av.open(str(out / "overlay.mp4")) as c:
    f = next(c.decode(video=0))
    assert (f.height, f.width) == (videos.W, videos.H)


def test_stream_that_changes_size(tmp_path, stub_model):
  """Two MPEG-TS segments of different sizes, concatenated (as a recorded
  adaptive stream can be): each mask at its frame's size; the overlay video
  scales the later frames to the first frame's size."""
  picture = videos.stored_picture()
  small = videos.write_pictures(tmp_path / "a.ts", [picture] * 8, fmt="mpegts")
  bigger = np.asarray(Image.fromarray(picture).resize((120, 72)))
  big = videos.write_pictures(tmp_path / "b.ts", [bigger] * 8, fmt="mpegts")
  path = tmp_path / "ab.ts"
  path.write_bytes(open(small, "rb").read() + open(big, "rb").read())
  out = tmp_path / "out"
  s = predict.predict(_config(), str(path), str(out), variables=stub_model,
                      every_frame=True, progress=False)
  assert s["num_frames"] == 16
  sizes = [Image.open(out / "masks" / f"{r['index']:05d}.png").size
           for r in s["frames"]]
  assert sizes == [(videos.W, videos.H)] * 8 + [(120, 72)] * 8
  with av.open(str(out / "overlay.mp4")) as c:
    sizes = {(f.width, f.height) for f in c.decode(video=0)}
  assert sizes == {(videos.W, videos.H)}


def test_audio_that_changes_rate(tmp_path, stub_model):
  """MPEG-TS segments at 48 and 44.1 kHz, concatenated: the second is
  resampled, not read as 48 kHz (which would make it 8% short and its
  660 Hz tone 606 Hz), in the model's audio and in the overlay video's."""
  pictures = [videos.stored_picture()] * 12
  a = videos.write_pictures(tmp_path / "a.ts", pictures, fmt="mpegts",
                            tone=440, audio_rate=48000)
  b = videos.write_pictures(tmp_path / "b.ts", pictures, fmt="mpegts",
                            tone=660, audio_rate=44100)
  path = tmp_path / "ab.ts"
  path.write_bytes(open(a, "rb").read() + open(b, "rb").read())
  wave = video_io.read_audio(video_io.probe(str(path)), 0.975)
  assert abs(len(wave) / 16000 - 6.0) < 0.1, len(wave) / 16000
  assert abs(videos.peak_hz(wave[8000:40000]) - 440) < 10
  assert abs(videos.peak_hz(wave[56000:88000]) - 660) < 10
  predict.predict(_config(), str(path), str(tmp_path / "out"),
                  variables=stub_model, progress=False)
  np.testing.assert_allclose(_tones(str(tmp_path / "out" / "overlay.mp4"), 6),
                             [440] * 3 + [660] * 3, rtol=0.02)


def test_every_frame_of_a_variable_rate_video(tmp_path, stub_model):
  """10 s at 10 fps, then 10 s at 30 fps: the overlay video shows each
  frame at its own moment (at the average 20 fps the first half would run
  twice too fast, 5 s ahead of its sound at 10 s)."""
  pts = [3 * i for i in range(100)] + list(range(300, 600))   # 1/30 s units
  path = videos.write_pictures(
      tmp_path / "vfr.mp4", [np.zeros((32, 32, 3), np.uint8)] * len(pts),
      rate=30, pts=pts)
  s = predict.predict(_config(), path, str(tmp_path / "out"),
                      variables=stub_model, every_frame=True, progress=False)
  assert s["num_frames"] == 400
  with av.open(str(tmp_path / "out" / "overlay.mp4")) as c:
    times = [f.time for f in c.decode(video=0)]
  np.testing.assert_allclose(times, np.asarray(pts) / 30, atol=1e-4)


# ---------------------------------------------------------- end to end --
@pytest.mark.slow
def test_masks_follow_the_sounding_object(tmp_path, video):
  """A small model trained here on the synthetic classes (predict_model), on
  the video: circle sounds 0-4 s, square 4-8 s, triangle 8-12 s. Its masks
  must cover the object sounding at each sampled second, not the others;
  with the audio of the wrong time (a misaligned pipeline) they would not."""
  import predict_model  # pylint: disable=g-import-not-at-top
  cfg = predict_model.config()
  variables = predict_model.trained_variables(cfg)
  out = str(tmp_path / "out")
  # 2 windows (10 frames) per call: the last call is 2 real + 8 padded.
  s = predict.predict(cfg, video.path, out, variables=variables,
                      batch_clips=2, progress=False)
  sounding, silent = predict_model.sounding_vs_silent_iou(s, out, video)
  print(f"IoU with the sounding object {sounding:.3f}, best silent "
        f"{silent:.3f}; {s['frames_per_s_model']} frames/s in the model")
  assert sounding > 0.5 and sounding > 3 * silent, (sounding, silent)
  with av.open(os.path.join(out, "overlay.mp4")) as c:
    assert len(c.streams.video) == 1 and len(c.streams.audio) == 1
  # The CLI on an export of these variables, without --config: it takes
  # the config the export was made with (its config.json): the same masks.
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from avsegformer_jax import checkpoint, run_config  # pylint: disable=g-import-not-at-top
  export, cli = tmp_path / "export", tmp_path / "cli"
  checkpoint.save_variables(export, variables, config=cfg)
  r = subprocess.run(
      [sys.executable, "-m", "avsegformer_jax.predict", f"--checkpoint={export}",
       f"--video={video.path}", f"--out={cli}", "--batch_clips=2",
       "--nooverlay_images"],
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
      capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.startswith(f"config: {export / 'config.json'}\n"), r.stdout
  names = sorted(os.listdir(os.path.join(out, "masks")))
  assert sorted(os.listdir(cli / "masks")) == names
  for name in names:
    np.testing.assert_array_equal(
        np.asarray(Image.open(cli / "masks" / name)),
        np.asarray(Image.open(os.path.join(out, "masks", name))))
  # A released .pth holds no config: then --config is needed.
  with pytest.raises(predict.PredictError, match=r"no --config given, and "
                     r".*x.pth: a released .pth holds no config; give one"):
    run_config.own_config(str(tmp_path / "x.pth"), predict.PredictError)
