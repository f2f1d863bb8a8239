"""Checkpoints with orbax: training state, and model-only exports.

A training workdir holds two orbax CheckpointManagers:
  WORKDIR/checkpoints/<step>/{state,meta}  the latest `keep` steps
  WORKDIR/best/<step>/{state,meta}          the best by validation mIoU
                                            (model variables only)
`state` is the whole TrainState (params, batch_stats, optimizer state, step,
RNG), `meta` a small JSON (epoch, metrics). The data position is the step
(the trainer restarts its iterator at batch `step`); checkpoints written
before 2026-11-28 also hold grain's iterator state as `data`, now unread.
Orbax writes into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact.

A model export (`save_variables`, written by the converter) is
DIR/variables (params + batch_stats) and DIR/avsegformer.json.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp

from avsegformer_jax import errors, files

EXPORT_MARKER = "avsegformer.json"


class CheckpointError(errors.InputError):
  pass


def _abs(path) -> str:
  return files.absolute(path)


class Checkpointer:
  """Latest-N and best-by-mIoU training checkpoints of one workdir."""

  def __init__(self, workdir, keep: int = 3, keep_best: bool = True):
    root = _abs(workdir)
    # Synchronous saves: a step's checkpoint is complete when save returns
    # (the loop may stop right after it: SIGTERM, the last step).
    self.latest = ocp.CheckpointManager(
        files.join(root, "checkpoints"),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, enable_async_checkpointing=False),
        item_names=("state", "data", "meta"))   # "data": older checkpoints
    self.best = None
    if keep_best:
      self.best = ocp.CheckpointManager(
          files.join(root, "best"),
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_fn=lambda m: m["miou"],
              best_mode="max", enable_async_checkpointing=False),
          item_names=("state", "meta"))

  def latest_step(self):
    return self.latest.latest_step()

  def save(self, step: int, state, meta: dict[str, Any]):
    self.latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
                     force=True)

  def save_best(self, step: int, variables, meta: dict[str, Any]):
    """Offer `variables` to the best manager; kept only if its mIoU is best."""
    if self.best is None:
      return
    self.best.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(variables), meta=ocp.args.JsonSave(meta)),
                   metrics={"miou": float(meta["miou"])}, force=True)

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self.latest.restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, state_target):
    """Restores into `state_target` (shapes/shardings)."""
    out = self.latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state_target),
        meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def close(self):
    self.latest.close()
    if self.best is not None:
      self.best.close()


def save_variables(directory, variables, info: dict[str, Any] | None = None):
  """Exports model variables ({"params", "batch_stats"}) for eval/predict."""
  root = _abs(directory)
  files.makedirs(root)
  target = files.join(root, "variables")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, jax.device_get(dict(variables)), force=True)
  files.write_text(files.join(root, EXPORT_MARKER), json.dumps(
      {"format": "avsegformer-jax variables", **(info or {})}, indent=2))


def _restore_tree(path):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path)


def load_variables(directory, prefer: str = "best") -> dict[str, Any]:
  """Model variables from an export or a training workdir.

  A workdir gives its best checkpoint (`prefer="best"`) or its latest one
  (`prefer="latest"`), falling back to whichever exists.
  """
  root = _abs(directory)
  if not files.is_dir(root):
    raise CheckpointError(f"{root}: no such checkpoint directory")
  if files.exists(files.join(root, EXPORT_MARKER)):
    tree = _restore_tree(files.join(root, "variables"))
    return {"params": tree["params"],
            "batch_stats": tree.get("batch_stats", {}) or {}}
  order = ("best", "checkpoints") if prefer == "best" else ("checkpoints",
                                                            "best")
  for sub in order:
    mdir = files.join(root, sub)
    if not files.is_dir(mdir):
      continue
    # Finalized steps only (an interrupted save's tmp dir is not one); no
    # manager: a read-only one logs three warnings per load.
    steps = ocp.utils.checkpoint_steps(mdir)   # best/ keeps a single step
    if not steps:
      continue
    state = _restore_tree(files.join(mdir, str(max(steps)), "state"))
    return {"params": state["params"],
            "batch_stats": state.get("batch_stats", {}) or {}}
  raise CheckpointError(
      f"{root}: neither a model export ({EXPORT_MARKER}) nor a training "
      "workdir with checkpoints/ or best/")
