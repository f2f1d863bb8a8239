"""Which checkpoint `load_variables` picks from a workdir, and its errors."""
import logging
import os
import shutil

import numpy as np
import pytest

from avsegformer_jax import checkpoint


def _variables(value):
  return {"params": {"w": np.full((2, 3), value, np.float32)},
          "batch_stats": {"mean": np.full((3,), -value, np.float32)}}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """Steps 1 and 2 saved; the best is step 1 (higher mIoU)."""
  root = tmp_path_factory.mktemp("workdir")
  ckpt = checkpoint.Checkpointer(root)
  for step, miou in ((1, 0.9), (2, 0.5)):
    ckpt.save(step, _variables(step), {"epoch": step})
    ckpt.save_best(step, _variables(step), {"miou": miou})
  ckpt.close()
  return root


def _value(variables):
  np.testing.assert_array_equal(variables["batch_stats"]["mean"],
                                -variables["params"]["w"][0, 0])
  return float(variables["params"]["w"][0, 0])


def test_best_by_default_latest_on_request(workdir, caplog):
  with caplog.at_level(logging.WARNING):
    assert _value(checkpoint.load_variables(workdir)) == 1
    assert _value(checkpoint.load_variables(workdir, prefer="latest")) == 2
  # Loading is quiet (a read-only orbax manager logged three warnings).
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_interrupted_save_is_not_a_step(workdir, tmp_path):
  """A run killed mid-save leaves `<step>.orbax-checkpoint-tmp-*`: the
  finalized steps are what counts."""
  root = tmp_path / "w"
  shutil.copytree(workdir, root)
  src = root / "checkpoints" / "2"
  shutil.copytree(src, root / "checkpoints" / "7.orbax-checkpoint-tmp-123")
  assert _value(checkpoint.load_variables(root, prefer="latest")) == 2
  # With best/ gone, "best" falls back to the latest.
  shutil.rmtree(root / "best")
  assert _value(checkpoint.load_variables(root)) == 2


def test_errors_name_the_directory(tmp_path):
  with pytest.raises(checkpoint.CheckpointError, match="no such"):
    checkpoint.load_variables(tmp_path / "missing")
  os.makedirs(tmp_path / "empty" / "checkpoints")
  with pytest.raises(checkpoint.CheckpointError,
                     match=str(tmp_path / "empty") + ".*neither"):
    checkpoint.load_variables(tmp_path / "empty")
