"""Scoring a model on a split: the original's metrics, per batch and over
the split (and per clip and category for `--mode=eval`), and the masks and
overlays of its first clips.

Used by the training loop (validation at each epoch's end) and by
`trainer.evaluate_checkpoint` (`main.py --mode=eval`).
"""
from __future__ import annotations

import jax
import numpy as np

from avsegformer_jax import avsegformer, metrics, progress, train, visualize


def evaluate(config, steps: train.Steps, variables, split: str, *,
             shuffle_audio: bool = False, vis_dir: str | None = None,
             num_visualize: int = 0, source=None, desc="eval",
             per_clip: bool = False, stop=None) -> dict | None:
  """Scores `variables` on a split: the original's per-batch averages and
  the dataset-level values (and per class for AVSS). `per_clip` adds
  `per_category` (S4's categories, AVSS's subsets v1s / v1m / v2) and
  `clips`, each clip's scores in the split's order (`_Clips`). None if
  `stop()` turns True before the last batch (training's Ctrl-C)."""
  from datasets import input_pipeline  # pylint: disable=g-import-not-at-top
  ds, info = input_pipeline.create_dataset(
      config, split, train=False, source=source, shuffle_audio=shuffle_audio)
  variables = avsegformer.cast_weights(
      train.replicate(variables, steps.mesh), config.model.dtype)
  total, per_batch = None, []
  clips = _Clips() if per_clip else None
  data = iter(ds)
  n = info["batches_per_epoch"]
  shown = progress.Progress(jax.process_index() == 0, total=n, desc=desc,
                            leave=False)
  try:
    for i, batch in enumerate(data, 1):
      if stop is not None and stop():
        return None
      shown.line(f"{desc} {split}: batch {i}/{n}")
      stats, logits, frame = steps.eval(variables,
                                        train.shard_batch(batch, steps.mesh))
      if clips is not None:
        clips.add(batch, frame)
      stats = jax.tree_util.tree_map(np.asarray, stats)
      total = stats if total is None else jax.tree_util.tree_map(
          np.add, total, stats)
      if config.task != "avss":
        per_batch.append(metrics.binary_scores(stats))
      if vis_dir and num_visualize:
        _visualise(config, batch, logits, vis_dir, num_visualize)
      shown.bar.update(1)
  finally:
    shown.close()
    input_pipeline.close(data)
  if config.task == "avss":
    # The original accumulates AVSS statistics over the whole split, so its
    # number is already dataset-level.
    res = metrics.semantic_scores(total)
    res.update(miou_dataset=res["miou"], fscore_dataset=res["fscore"])
  else:
    ds_level = metrics.binary_scores(total)
    res = {"miou": float(np.mean([b["miou"] for b in per_batch])),
           "fscore": float(np.mean([b["fscore"] for b in per_batch])),
           "miou_dataset": ds_level["miou"],
           "fscore_dataset": ds_level["fscore"]}
  res.update(split=split, num_clips=info["num_clips"],
             batch_size=info["global_batch"], shuffled_audio=shuffle_audio)
  if clips is not None:
    res.update(clips.scores(config.task))
  return res


def _local_rows(x) -> np.ndarray:
  """This process's rows of a global array split over `data`, in the order
  of its local batch (`train.shard_batch` laid them out so)."""
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


class _Clips:
  """Each clip's metric sums, from the eval step's per-frame stats: a clip's
  scores are the split's computed over its frames alone (AVSS: the mean over
  the classes the clip shows or the model predicts, the original's
  "seen" classes), a category's over its clips' frames."""

  def __init__(self):
    self.rows = []        # per batch: this process's clips, padding included

  def add(self, batch, frame):
    b, t = batch["frames"].shape[:2]
    sums = {k: _local_rows(v).reshape((b, t) + v.shape[1:]).sum(1,
                                                                 np.float64)
            for k, v in frame.items()}
    self.rows.append(dict(
        sums, valid=np.asarray(batch["clip_valid"]) > 0,
        index=np.asarray(batch["meta_index"]),
        clip_id=list(batch["meta_clip_id"]),
        category=list(batch["meta_category"])))

  def scores(self, task: str) -> dict:
    """{"clips": [{clip_id, category, miou, fscore, frames}...],
    "per_category": {category: {miou, fscore, num_clips}}} (the latter
    left out where clips have no category: MS3)."""
    rows = {k: _encode(sum((r[k] for r in self.rows), []))
            if k in ("clip_id", "category")
            else np.concatenate([r[k] for r in self.rows])
            for k in self.rows[0]}
    rows = _gather(rows)
    keep = np.flatnonzero(rows["valid"])
    keep = keep[np.argsort(rows["index"][keep], kind="stable")]
    stat_keys = [k for k in rows if k.endswith(("_sum", "frames", "count"))]
    score = metrics.semantic_scores if task == "avss" else \
        metrics.binary_scores
    clips, groups = [], {}
    for i in keep:
      s = score({k: rows[k][i] for k in stat_keys})
      cat = _decode(rows["category"][i])
      clips.append({"clip_id": _decode(rows["clip_id"][i]), "category": cat,
                    **_clip_scores(s, task)})
      if "frames" in rows:               # S4/MS3: the frames scored
        clips[-1]["frames"] = int(rows["frames"][i])
      groups.setdefault(cat, []).append(i)
    out = {"clips": clips}
    if any(groups):
      out["per_category"] = {
          cat: {**_category_scores(score({k: rows[k][ix].sum(0)
                                          for k in stat_keys}), task),
                "num_clips": len(ix)}
          for cat, ix in sorted(groups.items())}
    return out


def _clip_scores(s, task):
  if task == "avss":
    return {"miou": s["miou_seen"], "fscore": s["fscore_seen"]}
  return {"miou": s["miou"], "fscore": s["fscore"]}


def _category_scores(s, task):
  if task == "avss":
    return {k: s[k] for k in ("miou", "fscore", "miou_seen", "fscore_seen")}
  return {"miou": s["miou"], "fscore": s["fscore"]}


def _encode(texts) -> np.ndarray:
  """str[B] -> uint8 [B, L] (zero padded): strings cannot cross processes."""
  raw = [str(t).encode() for t in texts]
  out = np.zeros((len(raw), max([len(r) for r in raw] + [1])), np.uint8)
  for i, r in enumerate(raw):
    out[i, :len(r)] = np.frombuffer(r, np.uint8)
  return out


def _decode(row) -> str:
  return bytes(row).rstrip(b"\0").decode()


def _gather(rows: dict) -> dict:
  """Every process's rows, concatenated (all processes get them)."""
  if jax.process_count() == 1:
    return rows
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  # Strings are as wide as each process's longest: pad to the widest.
  width = {k: int(np.max(multihost_utils.process_allgather(
      np.int32(rows[k].shape[1])))) for k in ("clip_id", "category")}
  rows = {k: np.pad(v, ((0, 0), (0, width[k] - v.shape[1])))
          if k in width else v for k, v in rows.items()}
  return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(
      rows, tiled=True))


def _visualise(config, batch, logits, vis_dir, limit):
  """Saves the clips of this process's part of the batch that are among the
  split's first `limit` (every clip for a negative `limit`). Every process
  writes its own: no collective, so processes that hold none of them never
  wait for the one that does."""
  want = [i for i in range(len(batch["clip_valid"]))
          if batch["clip_valid"][i] and (limit < 0 or
                                         batch["meta_index"][i] < limit)]
  if not want:
    return
  local = _local_rows(logits)          # this process's [b*T, H, W, C]
  b, t = batch["frames"].shape[:2]
  local = local.reshape((b, t) + local.shape[1:])
  for i in want:
    visualize.save_clip(vis_dir, str(batch["meta_clip_id"][i]),
                        batch["frames"][i], local[i],
                        config.model.num_classes, batch["vid_flag"][i] > 0)
