"""Scoring a model on a split: the original's metrics, per batch and over
the split, and the masks and overlays of its first clips.

Used by the training loop (validation at each epoch's end) and by
`trainer.evaluate_checkpoint` (`main.py --mode=eval`).
"""
from __future__ import annotations

import jax
import numpy as np

from avsegformer_jax import avsegformer, metrics, progress, train, visualize


def evaluate(config, steps: train.Steps, variables, split: str, *,
             shuffle_audio: bool = False, vis_dir: str | None = None,
             num_visualize: int = 0, source=None, desc="eval") -> dict:
  """Scores `variables` on a split: the original's per-batch averages and
  the dataset-level values (and per class for AVSS)."""
  from datasets import input_pipeline  # pylint: disable=g-import-not-at-top
  ds, info = input_pipeline.create_dataset(
      config, split, train=False, source=source, shuffle_audio=shuffle_audio)
  variables = avsegformer.cast_weights(
      train.replicate(variables, steps.mesh), config.model.dtype)
  total, per_batch = None, []
  data = iter(ds)
  n = info["batches_per_epoch"]
  shown = progress.Progress(jax.process_index() == 0, total=n, desc=desc,
                            leave=False)
  try:
    for i, batch in enumerate(data, 1):
      shown.line(f"{desc} {split}: batch {i}/{n}")
      stats, logits = steps.eval(variables,
                                 train.shard_batch(batch, steps.mesh))
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
  return res


def _visualise(config, batch, logits, vis_dir, limit):
  """Saves the clips of this process's part of the batch that are among the
  split's first `limit`. Every process writes its own: no collective, so
  processes that hold none of them never wait for the one that does."""
  want = [i for i in range(len(batch["clip_valid"]))
          if batch["clip_valid"][i] and batch["meta_index"][i] < limit]
  if not want:
    return
  # This process's rows of the global [B*T, H, W, C] logits, in the order
  # of its local batch (`train.shard_batch` laid them out so).
  shards = sorted(logits.addressable_shards,
                  key=lambda s: s.index[0].start or 0)
  local = np.concatenate([np.asarray(s.data) for s in shards])
  b, t = batch["frames"].shape[:2]
  local = local.reshape((b, t) + local.shape[1:])
  for i in want:
    visualize.save_clip(vis_dir, str(batch["meta_clip_id"][i]),
                        batch["frames"][i], local[i],
                        config.model.num_classes, batch["vid_flag"][i] > 0)
