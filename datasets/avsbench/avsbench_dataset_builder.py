"""TFDS builder for AVSBench (configs s4 / ms3 / avss), from the manual download.

Prepare once:

  python -m datasets.avsbench.prepare --config s4 --manual_dir RAW --data_dir OUT
  (= tfds build datasets/avsbench --manual_dir=RAW --data_dir=OUT --config=s4,
     where the `tfds` command runs: in tfds 4.9.10 it needs apache-beam to start)

RAW is the AVSBench root holding `Single-source/`, `Multi-sources/` and/or
`AVSS/` as distributed (or one of those folders itself); see `raw.py` for the
layouts. Output is array_record, one example per clip, splits
train / validation / test (the original's train / val / test). Neither this
build nor reading it (`tfds.data_source`) imports TensorFlow: images reach
TFDS already PNG/JPEG-encoded (raw.py encodes with PIL), which TFDS stores as is.

Bad input (missing or corrupt frame, mask of another size than its frame,
missing / empty / truncated / too short wav, CSV row naming a missing clip,
colour outside the AVSS palette) stops the build with `raw.AVSBenchError`
naming the file. With `AVSBENCH_SKIP_BAD_CLIPS=1` in the environment (or
`Builder(skip_bad_clips=True)`) such clips are skipped instead: each one is
logged, and all are listed in `skipped_clips.txt` in the prepared dataset's
folder and in its `metadata.json` (`skipped_clips`). Problems with the CSV or
label2idx.json themselves always stop the build.

Silent wavs are kept: AVSBench has clips whose sound track is all zeros (its
log-mel is log(0.01) everywhere, as the original computes it); they are
counted and listed in `metadata.json` (`silent_clips`).

`AVSBENCH_NUM_WORKERS` (default min(8, CPUs)) sets the threads that decode clips.
"""
from __future__ import annotations

import collections
import concurrent.futures
import logging
import os
import sys
import time

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from avsegformer_jax import progress

from . import raw   # relative, so it works both as datasets.avsbench.* and from `tfds build`

SKIP_ENV = "AVSBENCH_SKIP_BAD_CLIPS"
WORKERS_ENV = "AVSBENCH_NUM_WORKERS"
SKIPPED_FILE = "skipped_clips.txt"

_DESCRIPTIONS = {
    "s4": "AVSBench-object single-source (S4): 5 frames per clip, 1 sounding source; "
          "train clips have a mask for the first frame only.",
    "ms3": "AVSBench-object multi-source (MS3): 5 frames per clip, all masked.",
    "avss": "AVSBench-semantic (AVSS): v1s / v1m clips (5 frames) and v2 clips (10 frames), "
            "class-index masks over 71 classes (0 = background).",
}


def _progress_line(task, split, done, total, seconds) -> str:
  left = seconds / done * (total - done)
  return (f"avsbench/{task} {split}: {done}/{total} clips read in "
          f"{seconds / 60:.0f} min, about {left / 60:.0f} min to go")


def _env_flag(name: str) -> bool:
  return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


class Builder(tfds.core.GeneratorBasedBuilder):
  """AVSBench, read as distributed; log-mel computed at build time."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: frames, masks, VGGish log-mel, temporal flags."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=t, description=d)
                     for t, d in _DESCRIPTIONS.items()]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  AVSBench is form-gated: request it at http://www.avlbench.opennlplab.cn and
  unpack it unchanged, so that the manual dir holds Single-source/ (S4),
  Multi-sources/ (MS3) and/or AVSS/ (metadata.csv, label2idx.json, v1s/, v1m/, v2/).
  For a synthetic stand-in: python -m datasets.avsbench.synthesize --task s4 --out RAW
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds 4.9.10 finds a packaged builder's file through `importlib_resources`,
    # which current etils no longer installs on Python >= 3.11; the file is here.
    return epath.Path(__file__)

  def __init__(self, *, skip_bad_clips: bool | None = None, num_workers: int | None = None,
               file_format=None, **kwargs):
    self._skip_bad_clips = _env_flag(SKIP_ENV) if skip_bad_clips is None else skip_bad_clips
    if num_workers is None:
      num_workers = int(os.environ.get(WORKERS_ENV, 0)) or min(8, os.cpu_count() or 1)
    self._num_workers = max(1, num_workers)
    self._skipped: list[tuple[str, str, str]] = []   # (split, clip_id, reason)
    self._silent: list[tuple[str, str]] = []
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    t = raw.TASKS[self.builder_config.name].num_frames
    info = self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "clip_id": tfds.features.Text(),
            "category": tfds.features.Text(),
            "frames": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3))),
            "masks": tfds.features.Sequence(
                tfds.features.Image(shape=(None, None, 1), encoding_format="png")),
            "log_mel": tfds.features.Tensor(shape=(t, 96, 64), dtype=np.float32),
            "vid_flag": tfds.features.Tensor(shape=(t,), dtype=np.float32),
            "gt_flag": tfds.features.Tensor(shape=(t,), dtype=np.float32),
        }),
        homepage="http://www.avlbench.opennlplab.cn",
        metadata=tfds.core.MetadataDict(),
    )
    # Not in TFDS's bucket: its lookup, made for every builder whose data is
    # not there yet, only leaves an empty /tmp/tmp*tfds folder behind.
    info.initialize_from_bucket = lambda: None
    return info

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    task = self.builder_config.name
    root = raw.find_task_root(dl_manager.manual_dir, task)
    palette = None
    if task == "avss":
      self.info.metadata["class_names"] = raw.read_label2idx(root / "label2idx.json")
      palette = raw.avss_palette()
    clips = {name: raw.read_clips(root, task, orig) for name, orig in raw.SPLITS.items()}
    # A split the CSV does not mention is left out (TFDS cannot write an empty one).
    return {name: self._generate_examples(root, name, c, palette)
            for name, c in clips.items() if c}

  def _generate_examples(self, root, split: str, clips, palette):
    written, start = 0, time.time()
    # TFDS draws its bars on a terminal (prepare turns them off elsewhere);
    # into a batch job's log, a line at most every progress.EVERY_S instead.
    said = progress.Progress(show=not sys.stderr.isatty())
    for done, (clip, result) in enumerate(
        self._load_in_order(root, clips, palette), 1):
      said.line(lambda: _progress_line(self.builder_config.name, split, done,
                                       len(clips), time.time() - start))
      if isinstance(result, raw.AVSBenchError):
        if not self._skip_bad_clips:
          raise result
        logging.warning("avsbench: skipping %s clip %s: %s", split, clip.clip_id, result)
        self._skipped.append((split, clip.clip_id, str(result)))
        continue
      example, silent = result
      if silent:
        self._silent.append((split, clip.clip_id))
      written += 1
      yield clip.clip_id, example
    if not written:
      raise raw.AVSBenchError(
          f"{clips[0].csv_path}: all {len(clips)} clip(s) of split {split} are bad, nothing "
          f"to write; first: {self._skipped[-len(clips)][2]}")

  def _load_in_order(self, root, clips, palette):
    """Yields (clip, example or AVSBenchError) in CSV order, decoding ahead in threads."""
    def load(clip):
      try:
        return raw.load_clip(root, clip, palette)
      except raw.AVSBenchError as e:
        return e
    if self._num_workers == 1:
      for clip in clips:
        yield clip, load(clip)
      return
    with concurrent.futures.ThreadPoolExecutor(self._num_workers) as pool:
      pending = collections.deque()   # bounded look-ahead keeps memory flat
      for clip in clips:
        pending.append((clip, pool.submit(load, clip)))
        if len(pending) >= 4 * self._num_workers:
          c, fut = pending.popleft()
          yield c, fut.result()
      while pending:
        c, fut = pending.popleft()
        yield c, fut.result()

  def _download_and_prepare(self, dl_manager, download_config=None):
    self._skipped, self._silent = [], []
    super()._download_and_prepare(dl_manager, download_config)
    meta = self.info.metadata
    meta["skipped_clips"] = [{"split": s, "clip_id": c, "reason": r} for s, c, r in self._skipped]
    meta["silent_clips"] = {s: [c for s2, c in self._silent if s2 == s] for s in raw.SPLITS}
    lines = [f"# {len(self._skipped)} clip(s) skipped ({SKIP_ENV}="
             f"{int(self._skip_bad_clips)}); split<TAB>clip_id<TAB>reason"]
    lines += ["\t".join(item) for item in self._skipped]
    (self.data_path / SKIPPED_FILE).write_text("\n".join(lines) + "\n")
    if self._skipped:
      logging.warning("avsbench/%s: skipped %d bad clip(s), listed in %s",
                      self.builder_config.name, len(self._skipped), SKIPPED_FILE)
    logging.info("avsbench/%s: %d clip(s) with a silent wav kept",
                 self.builder_config.name, len(self._silent))
