"""Checkpoints with orbax: training state, and model-only exports.

A training workdir holds two orbax CheckpointManagers and a config:
  WORKDIR/checkpoints/<step>/{state,meta}  the latest `keep` steps
  WORKDIR/best/<step>/{state,meta}          the best by validation mIoU
                                            (model variables only)
  WORKDIR/config.json                       the config of its last run
                                            (run_config)
  WORKDIR/.lock                             held while a run trains there
                                            (files.exclusive)
`state` is the whole TrainState (params, batch_stats, optimizer state, step,
RNG), `meta` a small JSON (epoch, metrics). The data position is the step
(the trainer restarts its iterator at batch `step`); checkpoints written
before 2026-11-28 also hold grain's iterator state as `data`, now unread.
Orbax writes into a temporary directory and renames it when complete, so a
run killed mid-save leaves the previous checkpoint intact.

A model export (`save_variables`, written by the converter) is
DIR/variables (params + batch_stats), DIR/avsegformer.json and the config it
was converted with, DIR/config.json.

`model.scan_layers` is a compute choice, not part of the model: a checkpoint
written with repeated layers stacked for nn.scan (`layers`, leading [num]
axis) loads into unrolled ones (`layers_0`..) and back (`fit_tree`), for
evaluation, `predict`, fine-tuning and resuming alike. Anything else that
does not fit the config is named in a CheckpointError.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from avsegformer_jax import errors, files

EXPORT_MARKER = "avsegformer.json"


class CheckpointError(errors.InputError):
  pass


_AGAIN = ("; move it away to resume from the checkpoint before it, or train "
          "in a new workdir")
_SAVE_AGAIN = ("; the checkpoints before it are intact: free space (or fix "
               "the folder) and run the same command to resume from them")


def _orbax_io(call, where: str, what_next: str, failed: str = "be read"):
  """`call()` (an orbax read or write), with a checkpoint whose files cannot
  be read (truncated, deleted halfway, not orbax's) or written (a full disk)
  named in a CheckpointError, with the first error in the chain (orbax wraps
  TensorStore's in a bare Exception)."""
  _drop_closed_loop_reports()
  try:
    return call()
  except Exception as e:  # pylint: disable=broad-except
    root = e
    while root.__cause__ or root.__context__:
      root = root.__cause__ or root.__context__
    cause = (str(root).strip().splitlines() or [""])[0]
    if len(cause) > 300:              # TensorStore's reason is at its end
      cause = f"{cause[:140]} ... {cause[-150:]}"
    raise CheckpointError(f"{where}: cannot {failed} ({type(root).__name__}"
                          f": {cause}){what_next}") from e


def _drop_closed_loop_reports():
  """Once one read or write of a checkpoint fails, TensorStore's others call
  back into orbax's closed event loop from their threads, and each printed
  a traceback ("Event loop is closed") around our one-line error. Installed
  once, before the first checkpoint I/O (a failed save prints them before
  it returns); any other report goes to the hook before it."""
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_loop_reports", False):
    return

  def hook(report):
    if not (isinstance(report.exc_value, RuntimeError)
            and str(report.exc_value) == "Event loop is closed"):
      previous(report)

  hook.drops_closed_loop_reports = True
  sys.unraisablehook = hook


def _abs(path) -> str:
  return files.absolute(path)


def _tokens(path) -> tuple[str, ...]:
  """A pytree path as names, whatever the containers: a restored checkpoint
  holds dicts and lists where the live state has dataclasses and tuples."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
               for k in path)


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return {_tokens(p): x for p, x in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: x is None)[0] if x is not None}


def _other_layout(key, source, shape):
  """(value, source keys) of target `key` from layers the other way round:
  stacked in the target and unrolled in the source, or the reverse (then
  the key is (stacked key, layer index))."""
  for i, part in enumerate(key):
    if shape:                       # target stacked: source layers_0..
      parts = [key[:i] + (f"{part}_{j}",) + key[i + 1:]
               for j in range(shape[0])]
      if all(k in source for k in parts):
        return np.stack([np.asarray(source[k]) for k in parts]), parts
    m = re.fullmatch(r"(.+)_(\d+)", part)
    stacked = key[:i] + (m.group(1),) + key[i + 1:] if m else None
    if stacked in source and np.ndim(source[stacked]) == len(shape) + 1 and \
        int(m.group(2)) < np.shape(source[stacked])[0]:
      return (np.asarray(source[stacked])[int(m.group(2))],
              [(stacked, int(m.group(2)))])
  return None, []


def _some(keys, n=3) -> str:
  shown = ", ".join("/".join(k) if isinstance(k, tuple) else k
                    for k in list(keys)[:n])
  return shown + (", ..." if len(keys) > n else "")


def fit_tree(target, source, where: str, hint: str = ""):
  """`source` (a restored tree) as a tree like `target` (arrays or
  ShapeDtypeStructs), matched leaf by leaf on their paths, with repeated
  layers stacked or unrolled as the target has them (model.scan_layers).

  Raises CheckpointError naming the leaves that are missing, left over (a
  checkpoint of a deeper model would otherwise evaluate silently as a
  shallower one) or of another shape, then `hint`.
  """
  src = _flat(source)
  paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  leaves, used, missing, shapes = [], set(), [], []
  for path, want in paths:
    key, shape = _tokens(path), tuple(np.shape(want))
    value, keys = (src[key], [key]) if key in src else _other_layout(
        key, src, shape)
    used.update(keys)
    if value is None:
      missing.append(key)
    elif tuple(np.shape(value)) != shape:
      shapes.append(f"{'/'.join(key)}: checkpoint {tuple(np.shape(value))}, "
                    f"config {shape}")
    leaves.append(value)
  # Stacked layers go to unrolled ones only all together.
  layers = {}
  for k in used:
    if isinstance(k[-1], int):
      layers.setdefault(k[0], set()).add(k[1])
  extra = [k for k in src if k not in used and not (
      k in layers and len(layers[k]) == np.shape(src[k])[0])]
  # The parameters first: the optimizer's moments repeat them.
  missing, extra = (sorted(x, key=lambda k: (k[0] != "params", k))
                    for x in (missing, extra))
  extra = [f"{'/'.join(k)}: {np.shape(src[k])[0]} layers, the config "
           f"{len(layers[k])}" if k in layers else k for k in extra]
  if missing or extra or shapes:
    parts = [f"{len(missing)} missing ({_some(missing)})" if missing else "",
             f"{len(extra)} not in this model ({_some(extra)})" if extra
             else "",
             f"{len(shapes)} of another shape ({_some(shapes)})" if shapes
             else ""]
    raise CheckpointError(
        f"{where}: does not fit the config: "
        f"{'; '.join(p for p in parts if p)}. "
        f"{hint or 'Pass the config it was trained with.'}")
  return jax.tree_util.tree_unflatten(treedef, leaves)


def fit_variables(variables, shapes, where: str, hint: str = ""):
  """Model variables ({"params", "batch_stats"}) fitted to `shapes` (the
  config's, from `avsegformer.variable_shapes`); see `fit_tree`."""
  cols = ("params", "batch_stats")
  return fit_tree({k: shapes.get(k) or {} for k in cols},
                  {k: variables.get(k) or {} for k in cols}, where, hint)


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
        # Older checkpoints also hold grain's iterator state as "data".
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
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
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              meta=ocp.args.JsonSave(meta))
    _orbax_io(lambda: self.latest.save(step, args=args, force=True),
              f"{self.latest.directory}/{step}", _SAVE_AGAIN, "be saved")

  def save_best(self, step: int, variables, meta: dict[str, Any]):
    """Offer `variables` to the best manager; kept only if its mIoU is best."""
    if self.best is None:
      return
    args = ocp.args.Composite(state=ocp.args.StandardSave(variables),
                              meta=ocp.args.JsonSave(meta))
    _orbax_io(lambda: self.best.save(step, args=args, force=True,
                                     metrics={"miou": float(meta["miou"])}),
              f"{self.best.directory}/{step}", _SAVE_AGAIN, "be saved")

  def restore_meta(self, step: int) -> dict[str, Any]:
    args = ocp.args.Composite(meta=ocp.args.JsonRestore())
    return _orbax_io(lambda: self.latest.restore(step, args=args)["meta"],
                     f"{self.latest.directory}/{step}", _AGAIN)

  def restore(self, step: int, state_target, hint: str = ""):
    """Restores into `state_target` (arrays on one device), through
    `fit_tree` when the checkpoint's tree differs (another scan_layers, or
    a CheckpointError with `hint`)."""
    where = f"{self.latest.directory}/{step}"
    saved = _orbax_io(lambda: self.latest.item_metadata(step)["state"].tree,
                      where, _AGAIN)
    same = {k: tuple(m.shape) for k, m in _flat(saved).items()} == {
        k: tuple(np.shape(x)) for k, x in _flat(state_target).items()}
    if same:
      state = ocp.args.StandardRestore(state_target)
    else:         # the checkpoint's own tree, on the target's device
      device = jax.tree_util.tree_leaves(state_target)[0].sharding
      state = ocp.args.StandardRestore(jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          saved))
    out = _orbax_io(lambda: self.latest.restore(step, args=ocp.args.Composite(
        state=state, meta=ocp.args.JsonRestore())), where, _AGAIN)
    if same:
      return out["state"], out["meta"]
    return fit_tree(state_target, out["state"], where, hint), out["meta"]

  def close(self):
    self.latest.close()
    if self.best is not None:
      self.best.close()


def save_variables(directory, variables, info: dict[str, Any] | None = None,
                   config=None):
  """Exports model variables ({"params", "batch_stats"}) for eval/predict,
  with the config they were converted for (DIR/config.json, as a workdir
  keeps its run's) when one is given."""
  root = _abs(directory)
  files.makedirs(root)
  target = files.join(root, "variables")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(target, jax.device_get(dict(variables)), force=True)
  files.write_text(files.join(root, EXPORT_MARKER), json.dumps(
      {"format": "avsegformer-jax variables", **(info or {})}, indent=2))
  if config is not None:
    from avsegformer_jax import run_config  # pylint: disable=g-import-not-at-top
    run_config.save(config, root)


def _restore_tree(path):
  with ocp.StandardCheckpointer() as ckptr:
    return _orbax_io(lambda: ckptr.restore(path), path, "")


def resolve(directory, prefer: str = "best") -> str:
  """The directory whose variables `read_variables` reads for `directory`:
  an export or one step of a workdir as given, a workdir's best step
  (`prefer="best"`) or its latest one (`prefer="latest"`), falling back to
  whichever exists."""
  root = _abs(directory)
  if not files.is_dir(root):
    raise CheckpointError(f"{root}: no such checkpoint directory")
  if files.exists(files.join(root, EXPORT_MARKER)) or files.exists(
      files.join(root, "state", "_METADATA")):
    return root
  order = ("best", "checkpoints") if prefer == "best" else ("checkpoints",
                                                            "best")
  for sub in order:
    mdir = files.join(root, sub)
    if not files.is_dir(mdir):
      continue
    # Finalized steps only (an interrupted save's tmp dir is not one); no
    # manager: a read-only one logs three warnings per load.
    steps = ocp.utils.checkpoint_steps(mdir)   # best/ keeps a single step
    if steps:
      return files.join(mdir, str(max(steps)))
  raise CheckpointError(
      f"{root}: neither a model export ({EXPORT_MARKER}), a training "
      "workdir with checkpoints/ or best/, nor one of their steps")


def read_variables(directory, prefer: str = "best"
                   ) -> tuple[dict[str, Any], str]:
  """(model variables, the directory they were read from: `resolve`'s).

  A run training in the workdir replaces best/<step> with its successor
  and drops the oldest checkpoints/<step>: a step deleted while it was
  read is followed to the one that replaced it.
  """
  source = resolve(directory, prefer)
  for attempt in range(3):
    tree = files.join(source, "variables") if files.exists(
        files.join(source, EXPORT_MARKER)) else files.join(source, "state")
    try:
      return _variables(_restore_tree(tree)), source
    except CheckpointError:
      try:                      # (deleted, or being deleted: its successor)
        successor = resolve(directory, prefer)
      except CheckpointError:
        successor = source
      if successor == source or attempt == 2:
        raise
      logging.info("%s was replaced by %s while it was read; reading that",
                   source, successor)
      source = successor


def load_variables(directory, prefer: str = "best") -> dict[str, Any]:
  """Model variables from an export, a training workdir or one of its
  steps (WORKDIR/checkpoints/<step>, WORKDIR/best/<step>); see `resolve`.
  The variables are as saved: `fit_variables` fits them to a config."""
  return read_variables(directory, prefer)[0]


def _variables(tree) -> dict[str, Any]:
  return {"params": tree["params"],
          "batch_stats": tree.get("batch_stats", {}) or {}}
