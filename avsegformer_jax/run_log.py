"""A training run's logs in its workdir, written by process 0 alone:

  WORKDIR/tensorboard/         TensorBoard scalars (train/*, eval/*,
                               eval_category/<category>/*)
  WORKDIR/train_metrics.jsonl  a line per logged step (TensorBoard's twin)
  WORKDIR/eval_metrics.jsonl   a line per epoch-end validation, with its
                               per-category scores; a resume reads it to
                               know whether the step it starts from was
                               validated (`validated`)
"""
from __future__ import annotations

import json
import math

import jax

from avsegformer_jax import files

TRAIN_LOG = "train_metrics.jsonl"
EVAL_LOG = "eval_metrics.jsonl"


class RunLog:
  """The writers of one run (none on processes other than 0)."""

  def __init__(self, workdir):
    self.workdir = workdir
    self.main = jax.process_index() == 0
    self._tb = None
    if self.main:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(files.join(workdir, "tensorboard"))

  def _scalars(self, step, values, prefix):
    for k, v in values.items():
      if isinstance(v, (int, float)) and math.isfinite(v):
        self._tb.add_scalar(f"{prefix}/{k}", v, step)

  def train(self, step: int, stats: dict) -> None:
    if self.main:
      self._scalars(step, stats, "train")
      append(self.workdir, TRAIN_LOG, {"step": step, **stats})

  def eval(self, step: int, epoch: float, res: dict) -> None:
    """The scores, and `per_category` (S4's categories, AVSS's subsets) as
    eval_category/<name>/* scalars and nested in the line."""
    if self.main:
      self._scalars(step, res, "eval")
      cats = res.get("per_category", {})
      for cat, scores in cats.items():    # (not its constant num_clips)
        self._scalars(step, {k: v for k, v in scores.items()
                             if k != "num_clips"}, f"eval_category/{cat}")
      append(self.workdir, EVAL_LOG, {
          "step": step, "epoch": epoch,
          **{k: v for k, v in res.items() if isinstance(v, (int, float))},
          **({"per_category": cats} if cats else {})})

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def append(workdir, name: str, record: dict) -> None:
  files.append_line(files.join(workdir, name), json.dumps(record))


def validated(workdir, step: int) -> bool:
  """Whether EVAL_LOG has the validation of `step`."""
  path = files.join(workdir, EVAL_LOG)
  if not files.exists(path):
    return False
  return any(json.loads(line).get("step") == step
             for line in files.read_text(path).splitlines() if line.strip())
