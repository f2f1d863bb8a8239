"""evaluation.py's per-clip and per-category scores: each clip's record is
what the split would score if it held that clip alone, each category's what
its clips alone would score; in the split's order, padding left out."""
import os
import sys

import jax
import numpy as np
import pytest

from avsegformer_jax import avsegformer, evaluation, train

sys.path.insert(0, os.path.dirname(__file__))
from train_driver import synthetic_source, tiny_config  # noqa: E402


def _setup(task):
  config = tiny_config()
  config.eval.num_visualize = 0
  if task == "avss":
    config.task, config.model.num_classes = "avss", 71
  model = avsegformer.build_model(config)
  variables = avsegformer.init_variables(model, jax.random.PRNGKey(0), 32)
  return config, train.Steps(model, config, train.make_mesh()), variables


def _source(task):
  """6 clips of 2 frames in two categories (S4's kind, AVSS's subsets); AVSS
  masks hold class ids 0, 5 and 9."""
  out = []
  for i, c in enumerate(synthetic_source(6, 2, 32, 7)):
    if task == "avss":
      c["masks"] = (c["masks"] * (5 if i % 2 else 9)).astype(np.uint8)
      c["masks"][:, :4] = 5
    out.append(dict(c, clip_id=_name(i).encode(),
                    category=(b"v2" if i % 2 else b"v1s") if task == "avss"
                    else (b"dog" if i % 3 else b"baby")))
  return out


def _name(i):
  return f"clip{i}" + "_" * (i * 7)     # names of batches differ in length


@pytest.mark.parametrize("task", ["s4", "avss"])
def test_each_clip_and_category_scores_as_if_alone(task):
  config, steps, variables = _setup(task)
  src = _source(task)

  def score(clips, **kw):
    return evaluation.evaluate(config, steps, variables, "validation",
                               source=clips, **kw)

  # Batches of 4 clips: the second one holds 2 and 2 padding slots.
  res = score(src, per_clip=True)
  clips = res["clips"]
  assert [c["clip_id"] for c in clips] == [_name(i) for i in range(6)]
  cats = [c["category"] for c in clips]
  assert cats == [s["category"].decode() for s in src]
  alone_key = ("miou_seen", "fscore_seen") if task == "avss" else (
      "miou_dataset", "fscore_dataset")
  for i in (1, 4):                       # one from each batch
    alone = score([src[i]])
    np.testing.assert_allclose(
        [clips[i]["miou"], clips[i]["fscore"]],
        [alone[alone_key[0]], alone[alone_key[1]]], rtol=1e-5, err_msg=i)
  assert sorted(res["per_category"]) == sorted(set(cats))
  keys = ("miou", "fscore") if task == "avss" else ("miou_dataset",
                                                    "fscore_dataset")
  for cat, got in res["per_category"].items():
    ix = [i for i, c in enumerate(cats) if c == cat]
    assert got["num_clips"] == len(ix)
    alone = score([src[i] for i in ix])
    np.testing.assert_allclose([got["miou"], got["fscore"]],
                               [alone[keys[0]], alone[keys[1]]], rtol=1e-5,
                               err_msg=cat)
  if task == "s4":
    # The frames scored (gt_flag: the source labels frame 1 of odd clips),
    # and the split's frame-weighted mIoU from the clips'.
    frames = np.array([c["frames"] for c in clips])
    assert frames.tolist() == [1, 2, 1, 2, 1, 2]
    np.testing.assert_allclose(
        np.sum([c["miou"] for c in clips] * frames) / frames.sum(),
        res["miou_dataset"], rtol=1e-5)
  # Without per_clip (each epoch's validation) the results are the same.
  plain = score(src)
  assert "clips" not in plain and "per_category" not in plain
  assert plain == {k: v for k, v in res.items()
                   if k not in ("clips", "per_category")}


@pytest.mark.parametrize("limit,want", [(2, 2), (-1, 6), (0, 0)])
def test_visualised_clips(tmp_path, limit, want):
  """eval.num_visualize: the split's first N clips (in its order, padding
  left out), every clip for -1 (masks for analysis), none for 0."""
  config, steps, variables = _setup("s4")
  vis = tmp_path / "vis"
  evaluation.evaluate(config, steps, variables, "validation",
                      source=_source("s4"), vis_dir=str(vis),
                      num_visualize=limit)
  got = sorted(os.listdir(vis)) if vis.exists() else []
  assert got == sorted(_name(i) for i in range(want))


def test_clips_without_a_category_have_no_per_category():
  """MS3's clips have no category: one "" group would only repeat the
  split's scores."""
  config, steps, variables = _setup("s4")
  src = [dict(c, category=b"") for c in _source("s4")]
  res = evaluation.evaluate(config, steps, variables, "validation",
                            source=src, per_clip=True)
  assert "per_category" not in res and len(res["clips"]) == 6


def test_encoded_names_come_back():
  names = np.array(["-0cWL0Lbs9I_30000_40000", "", "ü"], dtype=object)
  enc = evaluation._encode(names)  # pylint: disable=protected-access
  assert enc.dtype == np.uint8 and enc.shape[0] == 3
  assert [evaluation._decode(r) for r in enc] == list(names)  # pylint: disable=protected-access
