"""predict_outputs: what a predict run leaves in OUT (a folder per video,
predictions.json written last and whole) and how `--skip_done` reads it
back; several videos with one model; a write that fails."""
import json
import os

import numpy as np
import pytest

from avsegformer_jax import (checkpoint, predict, predict_outputs,
                             synthetic_video, video_io)
from predict_stub import config as _config, stub_forward as _stub_forward


def test_output_dirs_keep_names_alike_apart(tmp_path):
  assert predict_outputs.output_dirs(["/v/a.mp4"], "/o") == ["/o"]
  assert predict_outputs.output_dirs(
      ["/v/a.mp4", "/w/a.mp4", "/v/a.webm", "/v/.mp4", "/v/b"], "/o") == [
          "/o/a", "/o/a_2", "/o/a_3", "/o/.mp4", "/o/b"]


def test_summary_is_written_whole(tmp_path, monkeypatch):
  """A run killed while writing predictions.json leaves none (the outputs
  beside it are then not taken as finished), never a cut one."""
  predict_outputs.write_summary(str(tmp_path), {"num_frames": 3})
  assert json.loads((tmp_path / "predictions.json").read_text()) == {
      "num_frames": 3}
  def killed(*a, **kw):
    raise KeyboardInterrupt
  monkeypatch.setattr(predict_outputs.json, "dump", killed)
  (tmp_path / "x").mkdir()
  with pytest.raises(KeyboardInterrupt):
    predict_outputs.write_summary(str(tmp_path / "x"), {})
  assert not (tmp_path / "x" / "predictions.json").exists()


def test_done_before_needs_this_runs_settings(tmp_path):
  video = tmp_path / "v.mp4"
  video.write_bytes(b"")
  settings = {"checkpoint": "/c", "config_task": "s4", "image_size": 224,
              "window": 5, "sampling": "avsbench_1fps",
              "extraction": "avsbench"}
  assert predict_outputs.done_before(str(video), str(tmp_path), settings) \
      is None                                     # nothing there
  summary = {"video": str(video), **settings, "num_frames": 7}
  os.utime(video, (0, 0))
  predict_outputs.write_summary(str(tmp_path), summary)
  assert predict_outputs.done_before(str(video), str(tmp_path),
                                     settings) == summary
  for key, other in (("checkpoint", "/d"), ("config_task", "ms3"),
                     ("image_size", 512), ("window", 10),
                     ("sampling", "every_frame"),
                     ("extraction", "direct")):
    assert predict_outputs.done_before(
        str(video), str(tmp_path), {**settings, key: other}) is None, key
  (tmp_path / "predictions.json").write_text("[1, 2]")   # not a summary
  assert predict_outputs.done_before(str(video), str(tmp_path),
                                     settings) is None


def test_done_before_is_out_of_date_once_the_checkpoint_is_rewritten(
    tmp_path):
  """A .pth or an export overwritten in place (same path, new weights)
  makes the outputs made with it out of date, as a newer video does."""
  video, ckpt = tmp_path / "v.mp4", tmp_path / "model.pth"
  video.write_bytes(b"")
  ckpt.write_bytes(b"")
  os.utime(video, (0, 0))
  os.utime(ckpt, (0, 0))
  settings = {"checkpoint": str(ckpt), "config_task": "s4",
              "image_size": 224, "window": 5, "sampling": "avsbench_1fps",
              "extraction": "avsbench"}
  out = tmp_path / "out"
  out.mkdir()
  predict_outputs.write_summary(str(out), {"video": str(video), **settings})
  assert predict_outputs.done_before(str(video), str(out), settings)
  ckpt.write_bytes(b"new weights")
  os.utime(ckpt, (2e9, 2e9))
  assert predict_outputs.done_before(str(video), str(out), settings) is None


def test_several_videos_one_model(tmp_path, video, monkeypatch, stub_model):
  """A directory of videos: each to OUT/<name>/, one model and one forward
  for all, a video without audio skipped with its reason (not the end of
  the others), names alike kept apart."""
  made = []
  monkeypatch.setattr(predict, "_make_forward",
                      lambda *a: made.append(a) or _stub_forward(*a))
  d = tmp_path / "in"
  d.mkdir()
  os.symlink(video.path, d / "a.mp4")
  synthetic_video.write(d / "a.webm", size=32, schedule=((0, 2.0),))
  synthetic_video.write(d / "mute.mp4", size=32, schedule=((0, 2.0),),
                        with_audio=False)
  (d / "notes.txt").write_text("not a video")
  videos = video_io.expand_videos(f"{d}, {d / 'a*.mp4'}")
  assert videos == [str(d / n) for n in ("a.mp4", "a.webm", "mute.mp4")]
  lines = []
  done, skipped = predict.predict_videos(
      _config(), videos, str(tmp_path / "out"), variables=stub_model,
      progress=False, report=lines.append)
  assert len(made) == 1
  assert [s["num_frames"] for s in done] == [12, 2]
  assert [(v, r.split(";")[0]) for v, r in skipped] == [
      (str(d / "mute.mp4"), f"{d / 'mute.mp4'}: no audio track")]
  for name, n in (("a", 12), ("a_2", 2)):
    got = json.loads((tmp_path / "out" / name / "predictions.json").read_text())
    assert got["num_frames"] == n
  assert lines[1].startswith(f"2 frames (avsbench_1fps) -> {tmp_path / 'out' / 'a_2'}:")
  assert lines[2].startswith(f"skipped {d / 'mute.mp4'}: ")
  assert lines[0].startswith(f"12 frames (avsbench_1fps) -> {tmp_path / 'out' / 'a'}:")
  with pytest.raises(video_io.VideoError, match=r"nothing\*\.mp4: no videos"):
    video_io.expand_videos(str(tmp_path / "nothing*.mp4"))


def test_skip_done_goes_on_after_an_interruption(tmp_path, stub_model,
                                                 monkeypatch):
  d = tmp_path / "in"
  d.mkdir()
  for name in ("a.webm", "b.mkv"):
    synthetic_video.write(d / name, size=32, schedule=((0, 2.0),))
  vids = video_io.expand_videos(str(d))
  out = str(tmp_path / "out")
  predict.predict_videos(_config(), vids, out, variables=stub_model,
                         progress=False, report=lambda line: None)
  os.remove(tmp_path / "out" / "b" / "predictions.json")  # b was cut short
  ran, lines = [], []
  real = predict._run  # pylint: disable=protected-access
  monkeypatch.setattr(predict, "_run",
                      lambda p, v, *a: ran.append(v) or real(p, v, *a))
  done, _ = predict.predict_videos(_config(), vids, out, variables=stub_model,
                                   progress=False, skip_done=True,
                                   report=lines.append)
  assert ran == [vids[1]] and lines[0] == f"done before: {vids[0]} -> " \
      f"{tmp_path / 'out' / 'a'}"
  assert [s["num_frames"] for s in done] == [2, 2]
  # Other settings, or a video changed since: run again.
  ran.clear()
  predict.predict_videos(_config(), vids, out, variables=stub_model, fps=2,
                         progress=False, skip_done=True, report=lines.append)
  assert ran == vids
  ran.clear()
  done_at = os.path.getmtime(tmp_path / "out" / "a" / "predictions.json")
  os.utime(vids[0], (done_at + 60,) * 2)     # edited after that run
  predict.predict_videos(_config(), vids, out, variables=stub_model, fps=2,
                         progress=False, skip_done=True, report=lines.append)
  assert ran == [vids[0]]


def test_skip_done_runs_again_for_a_new_best_step(tmp_path, stub_model):
  """`--checkpoint=WORKDIR` reads its best step: outputs made with it are
  out of date once the run (still training there) saves a better one."""
  wd, out = tmp_path / "wd", str(tmp_path / "out")
  vids = [synthetic_video.write(tmp_path / "a.webm", size=32,
                                schedule=((0, 2.0),)).path]
  ckpt = checkpoint.Checkpointer(wd)
  variables = {"params": {"w": np.ones(2, np.float32)}, "batch_stats": {}}
  ckpt.save_best(1, variables, {"miou": 0.5})
  def run():
    lines = []
    done, _ = predict.predict_videos(
        _config(), vids, out, checkpoint_dir=str(wd), progress=False,
        skip_done=True, report=lines.append)
    return done[0]["checkpoint"], lines[0].startswith("done before")
  assert run() == (f"{wd}/best/1", False)
  assert run() == (f"{wd}/best/1", True)
  ckpt.save_best(2, variables, {"miou": 0.6})
  ckpt.close()
  assert run() == (f"{wd}/best/2", False)


@pytest.mark.parametrize("where", ["mask", "overlay video"])
def test_full_disk(tmp_path, video, stub_model, monkeypatch, where):
  """A write under OUT that fails (tried by hand on a 300 kB tmpfs: PIL's
  and PyAV's OSError tracebacks) is one error naming OUT."""
  import errno  # pylint: disable=g-import-not-at-top
  def full(*args, **kw):
    raise OSError(errno.ENOSPC, "No space left on device")
  if where == "mask":
    monkeypatch.setattr(predict.visualize, "save_mask_png", full)
  else:
    monkeypatch.setattr(video_io.OverlayWriter, "close", full)
  out = tmp_path / "out"
  with pytest.raises(predict.PredictError,
                     match=f"{out}: cannot write the outputs \\(No space left "
                     "on device\\); what is there for this video is "
                     "incomplete"):
    predict.predict(_config(), video.path, str(out), variables=stub_model,
                    progress=False)


