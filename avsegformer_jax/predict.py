"""Run a model on your own video: masks, overlays and an overlay video.

  python -m avsegformer_jax.predict --config=configs/s4.py:pvt2 \\
      --checkpoint=CKPT --video=FILE --out=DIR [--fps=1 | --every_frame] \\
      [--batch_clips=N]

CKPT is a model export (`avsegformer_jax.convert`), a training workdir (or
one of its steps) or a released `.pth` (converted on each run).
FILE may be several: comma-separated files, directories (their videos) and
globs, run with one model (`Predictor`) into OUT/<name>/ each.
Frames are sampled as AVSBench extracts them (`--fps=1`, see video_io), at
another rate, or all of them, and for S4/MS3 resized and paired with audio
as AVSBench's preprocessing made the training data (`--extraction`,
avsbench_extraction); each sampled frame gets one 0.96 s log-mel example:
  * `--fps=1`: the video is cut into clips of T seconds (T = the config's
    data.num_frames) and each clip's audio gives its T examples as AVSBench
    computes a clip's (consecutive 0.96 s examples from the clip start,
    short clips repeat the last / AVSS zero-pads), so the model sees what it
    was trained on and the 0.96 s vs 1 s drift never exceeds 0.04*T s;
  * other rates and `--every_frame`: the example centred on the frame's time.
The model runs over consecutive windows of T sampled frames (the last one
padded; padded frames are dropped), `--batch_clips` windows per call, all
calls of one shape so the forward compiles once.

Writes OUT/masks/NNNNN.png (binary: 0/255; AVSS: class index with the
AVSBench palette), OUT/overlays/NNNNN.png at the video's resolution, upright
as players show it, OUT/overlay.mp4 (H.264, at the sampling rate, or each
frame at its own time with --every_frame, with the original audio as AAC)
and OUT/predictions.json.
"""
from __future__ import annotations

import fractions
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from PIL import Image

from avsegformer_jax import audio as audio_lib
from avsegformer_jax import progress as progress_lib
from avsegformer_jax import (avsbench_extraction, avsegformer, checkpoint,
                             compile_cache, errors, files, predict_outputs,
                             pretrained, run_config, terminal, video_io,
                             visualize, xla_cpu)

PAD_MODES = {"s4": "repeat_last", "ms3": "repeat_last", "avss": "zero_pad"}


class PredictError(errors.InputError):
  """Bad input to predict; the message names the file and the problem."""


def preprocess(rgb: np.ndarray, size: int) -> np.ndarray:
  """uint8 [H, W, 3] -> ImageNet-normalised float32 [size, size, 3]
  (PIL bilinear straight resize, as the evaluation loader)."""
  img = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR))
  return (img.astype(np.float32) / 255.0 - visualize.MEAN) / visualize.STD


def _make_forward(model, num_classes: int):
  def forward(variables, frames, audio, valid):
    logits, _ = model.apply(variables, frames, audio, valid)
    if num_classes == 1:
      return logits[..., 0]                       # [N, S, S] logits
    return jnp.argmax(logits, -1).astype(jnp.int32)  # [N, S, S] classes
  return jax.jit(forward)


def _upsample(pred: np.ndarray, height: int, width: int, binary: bool):
  """Model-resolution prediction -> class map [H, W] uint8 at the video size
  (binary: bilinear on the logits then > 0; classes: nearest)."""
  if binary:
    img = Image.fromarray(pred.astype(np.float32), mode="F")
    return (np.asarray(img.resize((width, height), Image.BILINEAR)) > 0) \
        .astype(np.uint8)
  img = Image.fromarray(pred.astype(np.uint8))
  return np.asarray(img.resize((width, height), Image.NEAREST))


def like_avsbench(config, extraction: str) -> bool:
  try:
    return avsbench_extraction.applies(config.task, extraction)
  except ValueError as e:
    raise PredictError(str(e)) from None


def _open(video: str, fps: float, every_frame: bool, batch_clips: int,
          avsbench_audio: bool):
  """(info, 16 kHz mono audio) of a usable video; PredictError otherwise."""
  if batch_clips < 1:
    raise PredictError(f"batch_clips must be >= 1, got {batch_clips}")
  if not every_frame and not fps > 0:
    raise PredictError(f"fps must be > 0, got {fps}")
  try:
    info = video_io.probe(video)
    wave = video_io.read_audio(
        info, audio_lib.MIN_SAMPLES / audio_lib.SAMPLE_RATE, avsbench_audio)
  except video_io.VideoError as e:
    raise PredictError(str(e)) from None
  if info.duration is not None and info.duration < audio_lib.MIN_SAMPLES / 16000:
    raise PredictError(f"{video}: video is {info.duration:.3f} s long, shorter "
                       "than one 0.975 s audio example")
  return info, wave


class Predictor:
  """The model and its variables, loaded once for any number of videos (the
  forward compiles once per window shape, not once per video)."""

  def __init__(self, config, *, checkpoint_dir=None, variables=None,
               extraction: str = "avsbench"):
    self.like_avsbench = like_avsbench(config, extraction)
    try:
      model = avsegformer.build_model(config)
      avsegformer.check_config(config, jax.default_backend())
    except ValueError as e:
      raise PredictError(str(e)) from None
    try:
      if variables is None:
        variables, source = pretrained.read_model_variables(checkpoint_dir,
                                                            config)
      else:
        source = predict_outputs.checkpoint_source(checkpoint_dir)
        variables = checkpoint.fit_variables(
            variables, avsegformer.variable_shapes(model), "variables")
    except errors.InputError as e:  # checkpoint.CheckpointError, .pth errors
      raise PredictError(str(e)) from None
    self.config = config
    self.checkpoint = source     # a workdir's: the step read (best/<step>)
    self.made_with = {}      # {field: [its run's value, this config's]}
    if checkpoint_dir:
      differ = run_config.output_changes(config, checkpoint_dir)
      if differ:
        logging.warning(run_config.output_changes_note(checkpoint_dir, differ))
      self.made_with = {k: [a, b] for k, a, b in differ}
    self.variables = avsegformer.cast_weights(
        jax.device_put({k: variables[k] for k in ("params", "batch_stats")
                        if k in variables}), config.model.dtype)
    self.forward = _make_forward(model, config.model.num_classes)

  def settings(self, fps, every_frame) -> dict:
    """The summary's `predict_outputs.SETTINGS` for a run of this model."""
    return predict_outputs.settings(self.config, self.checkpoint,
                                    self.like_avsbench, fps, every_frame)

  def __call__(self, video: str, out_dir: str, *, fps: float = 1.0,
               every_frame: bool = False, batch_clips: int = 1,
               progress: bool = True, overlay_images: bool = True,
               opened=None) -> dict:
    """Runs the model over the video; returns the summary also written to
    OUT/predictions.json. Raises PredictError for unusable inputs."""
    info, wave = opened or _open(video, fps, every_frame, batch_clips,
                                 self.like_avsbench)
    return _run(self, video, out_dir, info, wave, fps, every_frame,
                batch_clips, progress, overlay_images)


def predict(config, video: str, out_dir: str, *, checkpoint_dir=None,
            variables=None, fps: float = 1.0, every_frame: bool = False,
            batch_clips: int = 1, progress: bool = True,
            overlay_images: bool = True, extraction: str = "avsbench") -> dict:
  """One video (`Predictor` for several); the video is checked before the
  model loads."""
  opened = _open(video, fps, every_frame, batch_clips,
                 like_avsbench(config, extraction))
  return Predictor(config, checkpoint_dir=checkpoint_dir,
                   variables=variables, extraction=extraction)(
                       video, out_dir, fps=fps, every_frame=every_frame,
                       batch_clips=batch_clips, progress=progress,
                       overlay_images=overlay_images, opened=opened)


def _run(predictor: Predictor, video, out_dir, *args) -> dict:
  """`_run_video`, with a failed write under OUT (a full or read-only disk)
  one PredictError, not a traceback from PIL or PyAV."""
  try:
    return _run_video(predictor, video, out_dir, *args)
  except OSError as e:   # input errors arrive as VideoError/PredictError
    raise PredictError(
        f"{out_dir}: cannot write the outputs ({e.strerror or e}); what is "
        "there for this video is incomplete") from None


def _run_video(predictor: Predictor, video, out_dir, info, wave, fps,
               every_frame, batch_clips, progress, overlay_images) -> dict:
  config, forward, variables = (predictor.config, predictor.forward,
                                predictor.variables)
  t_win, size = config.data.num_frames, config.data.image_size
  num_classes = config.model.num_classes
  avsbench = video_io.avsbench_mode(fps, every_frame)
  aligner = audio_lib.AudioAligner(
      wave, t_win, avsbench, PAD_MODES.get(config.task, "repeat_last"))
  rate = info.rate if every_frame else fractions.Fraction(fps).limit_denominator(1001)
  for sub in ("masks", "overlays") if overlay_images else ("masks",):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  per_call = batch_clips * t_win
  est = info.duration * (float(info.rate) if every_frame else fps) \
      if info.duration else None
  shown = progress_lib.Progress(
      progress, total=-(-int(round(est)) // t_win) if est else None,
      unit="window", desc="predict")
  writer = video_io.OverlayWriter(os.path.join(out_dir, "overlay.mp4"), info,
                                  rate, timed=every_frame)
  half = 0.5 / float(info.rate)   # every_frame samples sit mid-frame
  images = visualize.PngWriter()
  records, stats = [], {"model_s": 0.0, "compile_s": 0.0, "calls": 0}
  t_start = time.time()

  def run(batch):
    n = len(batch)
    frames = np.zeros((per_call, size, size, 3), np.float32)
    audio = np.zeros((per_call, audio_lib.EXAMPLE_FRAMES,
                      audio_lib.NUM_MEL_BINS), np.float32)
    valid = np.zeros((per_call,), np.float32)
    for j, s in enumerate(batch):
      frames[j] = preprocess(avsbench_extraction.frame(s.rgb)
                             if predictor.like_avsbench else s.rgb, size)
      audio[j] = aligner.example(s.index, s.time)
      valid[j] = 1.0
    # Padding repeats the last real frame (the model needs no zeros: frames
    # are independent and padded outputs are dropped).
    frames[n:], audio[n:] = frames[n - 1], audio[n - 1]
    t0 = time.time()
    pred = np.asarray(forward(variables, frames, audio, valid))
    stats["compile_s" if stats["calls"] == 0 else "model_s"] += time.time() - t0
    stats["calls"] += 1
    for j, s in enumerate(batch):
      mask = _upsample(pred[j], s.rgb.shape[0], s.rgb.shape[1], num_classes == 1)
      name = f"{s.index:05d}.png"
      images.submit(visualize.save_mask_png,
                    os.path.join(out_dir, "masks", name), mask, num_classes)
      over = visualize.overlay(s.rgb, mask, num_classes)
      if overlay_images:
        images.submit(visualize.save_rgb_png,
                      os.path.join(out_dir, "overlays", name), over)
      writer.add(over, at=s.time - half if every_frame else None)
      records.append({"index": s.index, "time": round(s.time, 4),
                      "source_frame": s.source_frame,
                      "foreground": float((mask > 0).mean())})
    shown.bar.update(-(-n // t_win))
    shown.line(lambda: f"predict {os.path.basename(video)}: "
               f"{batch[-1].time:.0f} s" + (f" of {info.duration:.0f}"
                                            if info.duration else ""))

  batch, done = [], False
  try:
    for s in video_io.sample_frames(info, fps, every_frame):
      batch.append(s)
      if len(batch) == per_call:
        run(batch)
        batch = []
    if batch:
      run(batch)
    images.close()
    writer.close()
    done = True
  except video_io.VideoError as e:
    raise PredictError(str(e)) from None
  finally:
    shown.close()
    if not done:
      images.abort()
      writer.abort()
  total = time.time() - t_start
  n = len(records)
  steady = stats["model_s"] / max(stats["calls"] - 1, 1) / per_call
  summary = {
      "video": os.path.abspath(video),
      **predictor.settings(fps, every_frame),
      **({"checkpoint_made_with": predictor.made_with}
         if predictor.made_with else {}),
      "batch_clips": batch_clips, "num_frames": n,
      "size": [info.width, info.height],          # as displayed
      "orientation": list(info.orientation),      # ffmpeg filters applied
      "overlay_video": os.path.join(out_dir, "overlay.mp4"),
      "seconds_total": round(total, 3),
      "first_call_s": round(stats["compile_s"], 3),
      "frames_per_s_end_to_end": round(n / total, 3),
      "frames_per_s_model": round(1.0 / steady, 3) if stats["calls"] > 1
                            else None,
      "frames": records}
  predict_outputs.write_summary(out_dir, summary)    # last, and whole
  return summary


def predict_videos(config, videos: list[str], out_dir: str, *,
                   checkpoint_dir=None, variables=None, fps: float = 1.0,
                   every_frame: bool = False, batch_clips: int = 1,
                   progress: bool = True, overlay_images: bool = True,
                   skip_done: bool = False, extraction: str = "avsbench",
                   report=print):
  """Every video with one model (loaded with the first usable video): a
  video that cannot be used is reported and skipped, not the end of the
  others; a checkpoint that cannot be used ends them all. `skip_done`: a
  video whose outputs a finished run of the same settings left is not run
  again (an interrupted batch goes on where it stopped).
  Returns (summaries, [(video, reason)] of those skipped)."""
  kw = dict(fps=fps, every_frame=every_frame, batch_clips=batch_clips)
  avsbench_audio = like_avsbench(config, extraction)
  files.make_output_dir(out_dir, "the output directory")
  predictor, done, skipped = None, [], []
  settings = predict_outputs.settings(
      config, predict_outputs.checkpoint_source(checkpoint_dir),
      avsbench_audio, fps, every_frame)
  for video, out in zip(videos, predict_outputs.output_dirs(videos, out_dir)):
    before = skip_done and predict_outputs.done_before(video, out, settings)
    if before:
      report(f"done before: {video} -> {out}")
      done.append(before)
      continue
    try:
      opened = _open(video, avsbench_audio=avsbench_audio, **kw)
    except PredictError as e:
      if len(videos) == 1:
        raise
      report(f"skipped {video}: {e}")
      skipped.append((video, str(e)))
      continue
    if predictor is None:
      predictor = Predictor(config, checkpoint_dir=checkpoint_dir,
                            variables=variables, extraction=extraction)
    done.append(predictor(video, out, opened=opened, progress=progress,
                          overlay_images=overlay_images, **kw))
    report(predict_outputs.summary_line(done[-1], out))
  return done, skipped


def _define_flags():
  """Defines the CLI flags; at import they would collide with other CLIs'."""
  errors.define_config_flag(
      "Model config: configs/<task>.py:<backbone>, or "
      "configs/run.py:CHECKPOINT (the config it was made with: the default "
      "for a training workdir or an export; a released .pth holds none).")
  flags.DEFINE_string("checkpoint", None, "Model export, training workdir "
                      "(or WORKDIR/checkpoints/<step>) or released .pth.")
  flags.DEFINE_string("video", None, "Input video (mp4, webm, mkv, ...); "
                      "several: comma-separated files, directories, globs "
                      "(then OUT/<name>/ each).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_float("fps", 1.0, "Sampled frames per second (1: AVSBench).")
  flags.DEFINE_bool("every_frame", False, "Run on every frame.")
  flags.DEFINE_integer("batch_clips", 1, "Windows of T frames per call.")
  flags.DEFINE_enum("extraction", "avsbench",
                    list(avsbench_extraction.CHOICES),
                    "avsbench: S4/MS3 frames and audio taken as AVSBench's "
                    "preprocessing took the training data (cv2 resize to "
                    "224, moviepy's 16 kHz audio); direct: straight from "
                    "the video (band-limited audio).")
  flags.DEFINE_bool("skip_done", False, "Leave out the videos whose "
                    "outputs a finished run with the same checkpoint and "
                    "settings left in OUT (to go on after an interruption).")
  flags.DEFINE_bool("overlay_images", True, "Write OUT/overlays/*.png too "
                    "(--nooverlay_images: masks and overlay.mp4 only; at "
                    "1080p every frame's overlay PNG is ~3 MB).")
  flags.DEFINE_string("xla_cache_dir", compile_cache.DEFAULT_DIR,
                      "Persistent compilation cache (empty: off).")
  flags.mark_flags_as_required(["checkpoint", "video", "out"])
  flags.register_multi_flags_validator(
      ["fps", "every_frame"], lambda v: not (v["every_frame"] and v["fps"] != 1),
      message="--fps and --every_frame exclude each other")


def _memory_advice(config, batch_clips: int) -> str:
  tips = [f"a smaller --batch_clips (now {batch_clips})"] * (batch_clips > 1)
  if config is not None and config.model.dtype == "float32":
    tips.append("--config.model.dtype=bfloat16")
  return ("try " + " or ".join(tips) if tips else
          "the model does not fit this device at this data.image_size")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f["verbosity"].present:       # orbax's INFO lines only with --v=0
    logging.set_verbosity(logging.WARNING)
  compile_cache.enable(f.xla_cache_dir)
  config = None
  try:
    config = f.config or run_config.own_config(f.checkpoint, PredictError)
    videos = video_io.expand_videos(f.video)
    with terminal.survive_hangup():
      _, skipped = predict_videos(
          config, videos, f.out, checkpoint_dir=f.checkpoint, fps=f.fps,
          every_frame=f.every_frame, batch_clips=f.batch_clips,
          overlay_images=f.overlay_images, skip_done=f.skip_done,
          extraction=f.extraction,
          report=lambda line: print(line, flush=True))
  except errors.InputError as e:       # PredictError, an unwritable --out
    errors.exit_with("predict", e)
  except KeyboardInterrupt:
    errors.exit_interrupted("predict", f"the videos finished are in {f.out}; "
                            "--skip_done goes on from there")
  except RuntimeError as e:            # XLA's, through jit
    oom = errors.out_of_memory(e, _memory_advice(config, f.batch_clips))
    if oom is None:
      raise
    errors.exit_with("predict", oom)
  if skipped:
    errors.exit_with("predict", PredictError(
        f"{len(skipped)} of {len(videos)} videos skipped (see above): "
        f"{', '.join(v for v, _ in skipped)}"), code=1)


if __name__ == "__main__":
  xla_cpu.configure()
  _define_flags()
  app.run(main, flags_parser=errors.parse_flags)
