"""Losses against the original's (goldens/losses.npz), relative 1e-5."""
import jax.numpy as jnp
import numpy as np
import pytest

from avsegformer_jax import losses

G = dict(np.load("tests/goldens/losses.npz"))


def nhwc(x):
  return jnp.asarray(x).transpose(0, 2, 3, 1)


def compute(task, loss_type):
  pred, mf = nhwc(G[f"{task}_pred"]), nhwc(G[f"{task}_mask_feature"])
  n = pred.shape[0]
  if task == "s4":            # B=2, T=5, labels for the first frame of each clip
    labels = np.zeros((n, 64, 64), np.float32)
    labels[0::5] = G["s4_gt"][:, 0, 0]
    weights = np.zeros(n, np.float32)
    weights[0::5] = 1
  elif task == "ms3":
    labels, weights = G["ms3_gt"][:, 0], np.ones(n, np.float32)
  else:
    labels, weights = G["avss_gt"], G["avss_gt_temporal_mask_flag"]
  main, mix = losses.per_frame_losses(pred, mf, jnp.asarray(labels), loss_type)
  return (float(losses.weighted_mean(main, weights)),
          0.1 * float(losses.weighted_mean(mix, weights)))


@pytest.mark.parametrize("task,loss_type,prefix", [
    ("s4", "dice", "s4_"), ("s4", "bce", "s4_bce_"), ("ms3", "dice", "ms3_"),
    ("ms3", "bce", "ms3_bce_"), ("avss", "ce", "avss_")])
def test_matches_golden(task, loss_type, prefix):
  main, mix = compute(task, loss_type)
  np.testing.assert_allclose(main, G[prefix + "iou_loss"], rtol=1e-5)
  np.testing.assert_allclose(mix, G[prefix + "mix_loss"], rtol=1e-5)
  np.testing.assert_allclose(main + mix, G[prefix + "total"], rtol=1e-5)


def test_dice_properties():
  g = jnp.asarray(np.random.RandomState(0).rand(3, 8, 8) > 0.5, jnp.float32)
  perfect = losses.dice_per_frame(jnp.where(g > 0, 50.0, -50.0), g)
  assert float(perfect.max()) < 1e-3
  wrong = losses.dice_per_frame(jnp.where(g > 0, -50.0, 50.0), g)
  assert float(wrong.min()) > 0.99


def test_unknown_loss_type_is_named():
  with pytest.raises(ValueError, match="train.loss"):
    losses.per_frame_losses(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 1, 1, 4)),
                            jnp.zeros((1, 4, 4)), "focal")


def test_the_loss_must_fit_the_task():
  """The wrong pair was not named: ce over S4's single logit is NaN where
  the mask is 1 (a class id out of range), so the run stopped as if it had
  diverged."""
  ce = losses.cross_entropy_per_frame(
      jnp.asarray(np.random.RandomState(0).randn(2, 4, 4, 1)),
      jnp.asarray([np.zeros((4, 4)), np.eye(4)], jnp.int32))
  assert float(ce[0]) == 0.0 and np.isnan(float(ce[1]))
  for task, loss in (("s4", "dice"), ("ms3", "bce"), ("avss", "ce")):
    losses.check_loss(loss, task)
  with pytest.raises(ValueError, match=r"^train.loss must be 'ce' for task "
                     r"'avss', got 'dice' \(configs/avss.py sets it\)$"):
    losses.check_loss("dice", "avss")
  with pytest.raises(ValueError, match="'dice' or 'bce' for task 'ms3'"):
    losses.check_loss("ce", "ms3")
