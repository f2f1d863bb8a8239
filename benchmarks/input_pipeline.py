"""Input-pipeline speed alone: clips/s and frames/s of `create_dataset` batches.

    python -m benchmarks.input_pipeline [--task s4] [--sizes 224,512]
        [--workers 1,2] [--clips N] [--frame_size PX] [--batches K]
        [--eval] [--train_frames K] [--data_dir DIR] [--json OUT]

Synthesizes `--clips` clips of the task at `--frame_size` px (AVSS frames
are 4:3, so its train resize crops) into a temporary directory (or
`--data_dir`, reused when already there), prepares them with the TFDS
builder, then for every output size x worker count reads batches from the
real pipeline (train: shuffled, AVSS short side + centre crop; `--eval`:
in order, straight resize) and times `--batches` of them after a warm-up
(worker start-up, reported apart as `first_batch_s`, and the batches decoded
ahead meanwhile), so the rate is the steady state. Nothing consumes the
batches: this is the most the pipeline can feed. frames/s counts real
frames (vid_flag), not the zero padding of AVSS clips. The machine's load
average is recorded: other processes slow the workers.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

T = {"s4": 5, "ms3": 5, "avss": 10}


def prepare_synthetic(task: str, root: Path, clips: int, frame_size: int, seed: int = 0):
  """Synthetic AVSBench under root/raw, prepared into root/tfds; -> (data_dir, MiB, s)."""
  from datasets.avsbench import prepare, synthesize   # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  synthesize.synthesize(task, root / "raw", num_videos=clips, seed=seed, size=frame_size)
  path = prepare.prepare(task, root / "raw", root / "tfds")
  return root / "tfds", prepare.folder_size(path) / 2**20, time.perf_counter() - t


def make_config(task: str, data_dir, size: int):
  from configs import tiny   # pylint: disable=g-import-not-at-top
  c = tiny.get_config()      # the model part is unused; data fields as the task configs
  c.task = task
  c.data.data_dir = str(data_dir)
  c.data.image_size = size
  c.data.num_frames = T[task]
  return c


def measure(config, *, workers: int, batch: int, batches: int, train: bool,
            train_frames: int | None = None) -> dict:
  """Steady-state rate over `batches` batches, after a warm-up that starts the
  workers and drains what they decoded ahead meanwhile (it would inflate the rate)."""
  from datasets import input_pipeline   # pylint: disable=g-import-not-at-top
  split = "train" if train else "validation"
  ds, info = input_pipeline.create_dataset(config, split, train=train, batch_size=batch,
                                           num_epochs=10**4, num_workers=workers,
                                           train_frames=train_frames)
  ahead = config.data.get("prefetch_batches", input_pipeline.PREFETCH_BATCHES)
  warmup = 1 + (ahead + 1) * max(workers, 1)
  it = iter(ds)
  t0 = time.perf_counter()
  next(it)
  first = time.perf_counter() - t0
  for _ in range(warmup - 1):
    next(it)
  clips = frames = 0
  t0 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
    clips += int(b["clip_valid"].sum())
    frames += int(b["vid_flag"][b["clip_valid"] > 0].sum())
  dt = time.perf_counter() - t0
  input_pipeline.close(it)
  return {"split": split, "split_clips": info["num_clips"], "workers": workers,
          "image_size": config.data.image_size, "batch": batch, "batches": batches,
          "warmup_batches": warmup, "clips": clips, "seconds": dt,
          "clips_per_s": clips / dt, "frames_per_s": frames / dt, "first_batch_s": first,
          "frames_per_clip": int(b["frames"].shape[1])}


def beside_steps(rows, names, *, frame_size: int = 288, batches: int = 10) -> None:
  """Adds to each `benchmarks.model` row what the pipeline feeds its config
  (task, size, the frames per training clip the trainer loads, the config's
  `data.num_workers`): train clips/s and eval frames/s, to read against the
  step's; below them the step would wait for data. Synthetic data, on this
  machine's CPUs."""
  from avsegformer_jax import avsegformer, train   # pylint: disable=g-import-not-at-top
  from benchmarks import model as bench_model      # pylint: disable=g-import-not-at-top
  found = {}
  with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
    data = {}
    for name in dict.fromkeys(names):
      config = bench_model.make_config(name)
      if config.task not in data:
        data[config.task] = prepare_synthetic(config.task, Path(tmp) / config.task,
                                              24, frame_size)[0]
      config.data.data_dir = str(data[config.task])
      frames = train.clip_frames(config, avsegformer.build_model(config))
      kw = dict(workers=config.data.num_workers, batch=2, batches=batches)
      tr = measure(config, train=True, train_frames=frames, **kw)
      ev = measure(config, train=False, **kw)
      found[name] = {"pipeline_train_clips_per_s": tr["clips_per_s"],
                     "pipeline_train_frames": frames,
                     "pipeline_eval_frames_per_s": ev["frames_per_s"],
                     "pipeline_workers": kw["workers"]}
  for r in rows:
    r.update(found.get(r["config"], {}))


def _ints(s: str):
  return [int(x) for x in s.split(",") if x.strip()]


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--task", default="s4", choices=sorted(T))
  p.add_argument("--sizes", default="224,512", help="output sides (px)")
  p.add_argument("--workers", default="1,2", help="grain worker processes (0 = in-process)")
  p.add_argument("--clips", type=int, default=20, help="synthetic clips, all splits (70/15/15)")
  p.add_argument("--frame_size", type=int, default=288, help="synthetic frame height (px)")
  p.add_argument("--batch", type=int, default=2, help="clips per batch")
  p.add_argument("--batches", type=int, default=30, help="timed batches per setting")
  p.add_argument("--eval", action="store_true", help="validation split, in order, no crop")
  p.add_argument("--train_frames", type=int, default=0,
                 help="load the first k frames of each train clip (S4 with PVTv2 "
                      "trains on 1: train.clip_frames); 0 = all")
  p.add_argument("--data_dir", default="", help="prepare here (reused) instead of a tmp dir")
  p.add_argument("--json", default="", help="write the results here")
  a = p.parse_args(argv)

  with tempfile.TemporaryDirectory(prefix="bench_pipeline_") as tmp:
    root = Path(a.data_dir or tmp)
    data_dir, mib, prep_s = prepare_synthetic(a.task, root, a.clips, a.frame_size)
    print(f"{a.task}: {a.clips} synthetic clips at {a.frame_size} px prepared in "
          f"{prep_s:.1f} s ({mib:.1f} MiB) under {data_dir}")
    load_before = os.getloadavg()
    rows = []
    for size in _ints(a.sizes):
      for w in _ints(a.workers):
        row = measure(make_config(a.task, data_dir, size), workers=w, batch=a.batch,
                      batches=a.batches, train=not a.eval,
                      train_frames=a.train_frames or None)
        rows.append(dict(row, task=a.task))
        print(f"  size {size} workers {w}: {row['clips_per_s']:.1f} clips/s", flush=True)
    load_after = os.getloadavg()

  print(common.fmt_table(rows, [
      ("task", "task", None), ("split", "split", None), ("size", "image_size", None),
      ("workers", "workers", None), ("T", "frames_per_clip", None),
      ("clips/s", "clips_per_s", "{:.1f}"),
      ("frames/s", "frames_per_s", "{:.1f}"), ("1st batch s", "first_batch_s", "{:.1f}")]))
  print(f"load average (1 min) before/after: {load_before[0]:.1f} / {load_after[0]:.1f} "
        f"on {os.cpu_count()} CPUs")
  result = {"rows": rows,
            "dataset": {"task": a.task, "clips": a.clips, "frame_size": a.frame_size,
                        "prepared_mib": mib, "prepare_s": prep_s},
            "host": {"node": platform.node(), "cpu_count": os.cpu_count(),
                     "loadavg_before": load_before, "loadavg_after": load_after,
                     "numpy": np.__version__}}
  common.write_json(a.json, result)
  return result


if __name__ == "__main__":   # grain workers are spawned: they must not rerun main()
  main()
