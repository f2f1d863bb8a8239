"""What a `predict` run leaves in OUT, and how a later run reads it back.

Each video's outputs go to a folder of their own (`output_dirs`), its
summary to OUT/predictions.json, written last and whole (`write_summary`):
its presence means the masks, overlays and overlay video beside it are
complete, so a batch run with `--skip_done` can go on after an interruption
without running a finished video again (`done_before`).
"""
from __future__ import annotations

import collections
import json
import os

from avsegformer_jax import checkpoint as checkpoint_lib
from avsegformer_jax import errors, files, video_io

SUMMARY = "predictions.json"

# The summary fields that must match for a run's outputs to be this run's.
SETTINGS = ("checkpoint", "config_task", "image_size", "window", "sampling",
            "extraction")


def sampling_name(fps: float, every_frame: bool) -> str:
  return ("avsbench_1fps" if video_io.avsbench_mode(fps, every_frame)
          else "every_frame" if every_frame else f"centred_{fps:g}fps")


def checkpoint_source(checkpoint_dir) -> str | None:
  """What `predict.Predictor` would read for `checkpoint_dir` (a workdir's
  best step: a better one, saved since, makes earlier outputs out of date).
  One that cannot be read is named when the model is loaded."""
  if checkpoint_dir is None:
    return None
  try:
    return checkpoint_lib.resolve(checkpoint_dir)
  except errors.InputError:        # a .pth, or not a checkpoint
    return files.absolute(checkpoint_dir)


def settings(config, checkpoint, like_avsbench: bool, fps: float,
             every_frame: bool) -> dict:
  """The summary's SETTINGS for a run of `config`'s model from `checkpoint`
  (None: variables given in memory)."""
  return {"checkpoint": files.absolute(checkpoint) if checkpoint else None,
          "config_task": config.task, "image_size": config.data.image_size,
          "window": config.data.num_frames,
          "sampling": sampling_name(fps, every_frame),
          "extraction": "avsbench" if like_avsbench else "direct"}


def output_dirs(videos: list[str], out_dir: str) -> list[str]:
  """OUT itself for one video; OUT/<name> for each of several (name_2, ...
  where two are called alike)."""
  if len(videos) == 1:
    return [out_dir]
  seen, dirs = collections.Counter(), []
  for v in videos:
    stem = os.path.splitext(os.path.basename(v))[0] or "video"
    seen[stem] += 1
    dirs.append(os.path.join(out_dir, stem if seen[stem] == 1
                             else f"{stem}_{seen[stem]}"))
  return dirs


def write_summary(out_dir: str, summary: dict) -> None:
  """OUT/predictions.json, whole or not at all (a tmp file renamed)."""
  path = os.path.join(out_dir, SUMMARY)
  with open(path + ".tmp", "w") as f:
    json.dump(summary, f, indent=1)
  os.replace(path + ".tmp", path)


def done_before(video: str, out: str, settings: dict) -> dict | None:
  """The summary in OUT/predictions.json if a finished run with these
  `settings` (SETTINGS: checkpoint, task, model input size, window,
  sampling, extraction) wrote it for this video, neither of them modified
  since; else None. A workdir's checkpoint is its best step's directory:
  a better one saved since is another checkpoint."""
  path = os.path.join(out, SUMMARY)
  try:
    with open(path) as f:
      s = json.load(f)
    made = os.path.getmtime(path)
    # The video, or the checkpoint overwritten in place, changed since.
    newer = os.path.getmtime(video) > made or (
        os.path.exists(settings["checkpoint"] or "")
        and os.path.getmtime(settings["checkpoint"]) > made)
  except (OSError, ValueError):
    return None
  same = (isinstance(s, dict) and s.get("video") == os.path.abspath(video)
          and not newer and all(s.get(k) == settings[k] for k in SETTINGS))
  return s if same else None


def summary_line(s: dict, out: str) -> str:
  """The line printed for each finished video."""
  model_fps = s["frames_per_s_model"]
  return (f"{s['num_frames']} frames ({s['sampling']}) -> {out}: "
          f"{s['frames_per_s_end_to_end']:.2f} frames/s end to end"
          + (f", {model_fps:.2f} frames/s in the model" if model_fps else "")
          + f" (first call incl. compile {s['first_call_s']:.1f} s)"
          + (f"; frames made upright ({', '.join(s['orientation'])})"
             if s.get("orientation") else ""))
