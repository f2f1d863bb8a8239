"""Metrics against the original's (goldens/metrics.npz), 1e-5 absolute."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avsegformer_jax import metrics

G = dict(np.load("tests/goldens/metrics.npz"))


def test_thresholds_are_the_originals():
  np.testing.assert_array_equal(metrics.THRESHOLDS, G["fmeasure_thresholds"])


@pytest.mark.parametrize("task", ["s4", "ms3"])
def test_binary_per_batch_and_test_score(task):
  pred, gt = G[f"{task}_pred"], G[f"{task}_gt"]
  start, batch_miou, batch_f, total = 0, [], [], None
  for size in G[f"{task}_batch_sizes"]:
    sl = slice(start, start + size)
    start += size
    s = metrics.binary_stats(jnp.asarray(pred[sl]), jnp.asarray(gt[sl]),
                             jnp.ones(size))
    sc = metrics.binary_scores(s)
    batch_miou.append(sc["miou"])
    batch_f.append(sc["fscore"])
    total = s if total is None else jax.tree_util.tree_map(jnp.add, total, s)
  np.testing.assert_allclose(batch_miou, G[f"{task}_batch_miou"], atol=1e-5)
  np.testing.assert_allclose(batch_f, G[f"{task}_batch_fmeasure"], atol=1e-5)
  np.testing.assert_allclose(np.mean(batch_miou), G[f"{task}_test_miou"], atol=1e-5)
  np.testing.assert_allclose(np.mean(batch_f), G[f"{task}_test_fmeasure"], atol=1e-5)
  # dataset-level mIoU is the mean over frames of the per-frame values
  ds = metrics.binary_scores(total)
  np.testing.assert_allclose(ds["miou"], G[f"{task}_frame_miou"].mean(), atol=1e-5)


@pytest.mark.parametrize("task", ["s4", "ms3"])
def test_binary_per_frame_and_all_empty(task):
  pred, gt = G[f"{task}_pred"], G[f"{task}_gt"]
  for i in range(len(pred)):
    s = metrics.binary_stats(jnp.asarray(pred[i:i + 1]), jnp.asarray(gt[i:i + 1]),
                             jnp.ones(1))
    np.testing.assert_allclose(metrics.binary_scores(s)["miou"],
                               G[f"{task}_frame_miou"][i], atol=1e-5)
  e = G[f"{task}_all_empty_pred"]
  s = metrics.binary_stats(jnp.asarray(e), jnp.zeros(e.shape), jnp.ones(len(e)))
  sc = metrics.binary_scores(s)
  assert sc["fscore"] == float(G[f"{task}_all_empty_fmeasure"]) == 0.0
  np.testing.assert_allclose(sc["miou"], G[f"{task}_all_empty_miou"], atol=1e-5)


def test_binary_weights_drop_frames():
  pred, gt = G["s4_pred"][:4], G["s4_gt"][:4]
  a = metrics.binary_stats(jnp.asarray(pred), jnp.asarray(gt),
                           jnp.asarray([1.0, 0, 1, 0]))
  b = metrics.binary_stats(jnp.asarray(pred[::2]), jnp.asarray(gt[::2]),
                           jnp.ones(2))
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-6)


def _semantic(prefix, ncls):
  s = metrics.semantic_stats(jnp.asarray(G[f"{prefix}_pred"]).transpose(0, 2, 3, 1),
                             jnp.asarray(G[f"{prefix}_gt"]),
                             jnp.ones(len(G[f"{prefix}_gt"])), ncls)
  return jax.tree_util.tree_map(np.asarray, s)


@pytest.mark.parametrize("prefix,ncls", [("c8", 8), ("c71_b0", 71),
                                         ("c71_b1", 71), ("c71_b2", 71)])
def test_semantic_batch_sums(prefix, ncls):
  s = _semantic(prefix, ncls)
  np.testing.assert_allclose(s["iou_sum"], G[f"{prefix}_ious"], atol=1e-5)
  np.testing.assert_allclose(s["fscore_sum"], G[f"{prefix}_fscores"], atol=1e-5)
  np.testing.assert_array_equal(s["count"], G[f"{prefix}_cls_count"])


@pytest.mark.parametrize("prefix,parts,ncls", [
    ("c8", ["c8"], 8), ("c71", ["c71_b0", "c71_b1", "c71_b2"], 71)])
def test_semantic_final_scores(prefix, parts, ncls):
  total = None
  for p in parts:
    s = _semantic(p, ncls)
    total = s if total is None else jax.tree_util.tree_map(np.add, total, s)
  sc = metrics.semantic_scores(total)
  f = lambda k: float(G[f"{prefix}_final_{k}"])
  for ours, theirs in [("miou", "miou"), ("fscore", "f_score"),
                       ("miou_noBg", "miou_noBg"), ("fscore_noBg", "f_score_noBg"),
                       ("miou_seen", "logged_running_iou"),
                       ("fscore_seen", "logged_running_f_score")]:
    np.testing.assert_allclose(sc[ours], f(theirs), atol=1e-5, err_msg=ours)
  np.testing.assert_allclose(sc["miou_per_class"], G[f"{prefix}_final_miou_per_class"],
                             atol=1e-5)
