"""The S4 train step's first-frame path (`train.supervised_every`): running
the head only on the supervised frame gives the loss, gradients, parameters
and batch statistics of the full T-frame step, for a backbone without batch
norm (PVTv2: frames sliced before it) and with it (ResNet-50: the backbone
sees every frame, as its batch statistics must). Frames come as the
pipeline gives them (uint8, normalised in the step) or already normalised."""
import jax
import numpy as np
import pytest

from avsegformer_jax import avsegformer, build_model, train, visualize
from benchmarks.model import random_batch
from configs import tiny


def _config(backbone, first_frame_only):
  c = tiny.get_config(backbone)
  c.model.dropout = c.model.drop_path = 0.0   # same maths, not same RNG draws
  c.train.freeze_backbone_epochs = 0          # backbone gradients too
  c.train.first_frame_only = first_frame_only
  # Adam's first step is sign(g) * lr: with eps 1e-8 a round-off-sized
  # gradient entry moves by +-lr either way (see tests/train_driver.py).
  c.train.adam_eps = 1e-3
  return c


def _step(config, batch):
  mesh = train.make_mesh(jax.devices()[:1])
  model = avsegformer.build_model(config, axis_name=train.AXIS)
  state = train.create_train_state(config, build_model(config),
                                   jax.random.PRNGKey(0))
  steps = train.Steps(model, config, mesh)
  with jax.default_matmul_precision("highest"):
    new, stats = steps.train(train.replicate(state, mesh),
                             train.shard_batch(batch, mesh))
  return jax.device_get((new.params, new.batch_stats, stats))


def _normalised(frames):
  """The original's ToTensor + Normalize of uint8 frames [..., 3], in numpy."""
  return (frames.astype(np.float32) / 255.0 - visualize.MEAN) / visualize.STD


def test_uint8_frames_are_normalised_on_the_device_as_the_original():
  frames = np.random.RandomState(0).randint(0, 256, (3, 4, 5, 3)).astype(np.uint8)
  frames[0, 0, 0] = (0, 255, 128)
  got = np.asarray(jax.jit(train.normalize_frames)(
      frames, np.array([1, 0, 1], np.float32)))
  assert got.dtype == np.float32
  # XLA's float32 division is not correctly rounded (a reciprocal and a
  # Newton step), so not bit-exact: <= 5e-7 here, on values up to 2.64.
  np.testing.assert_allclose(got[[0, 2]], _normalised(frames[[0, 2]]),
                             rtol=0, atol=1e-6)
  # A padded frame (vid_flag 0) is exactly zero after normalising, as the
  # original pads AVSS clips, not the normalised black (-mean / std).
  assert not got[1].any()


def _assert_same_stats(got, want):
  for k in ("loss", "iou_loss", "mix_loss"):
    np.testing.assert_allclose(got[k], want[k], rtol=1e-5, err_msg=k)
  # The gradient norm sits near a tie here: scaling the audio by 1 + 2**-22
  # moves it by 2.6e-5 (the head's first attention projections by 8e-4),
  # and jax 0.12's first-frame program lands on the other side. A frame or
  # a loss term wrongly in or out moves it by far more.
  np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)


@pytest.mark.parametrize("backbone", ["pvt2", "res50"])
def test_first_frame_path_equals_the_full_step(backbone):
  batch = random_batch(_config(backbone, False), clips=2)
  assert train.supervised_every(_config(backbone, True), 2) == 2
  # NaN where the first-frame path must not look: later frames' audio (their
  # VGGish and head are skipped) and, without batch norm, their pixels.
  poisoned = {k: v.copy() for k, v in batch.items()}
  poisoned["audio"][:, 1:] = np.nan
  if backbone == "pvt2":   # frames normalised on the host: the float path
    poisoned["frames"] = _normalised(batch["frames"])
    poisoned["frames"][:, 1:] = np.nan
  p1, bs1, s1 = _step(_config(backbone, True), poisoned)
  pf, bsf, sf = _step(_config(backbone, False), batch)
  _assert_same_stats(s1, sf)
  for tree1, treef in ((p1, pf), (bs1, bsf)):
    flat = dict(jax.tree_util.tree_leaves_with_path(treef))
    for path, a in jax.tree_util.tree_leaves_with_path(tree1):
      np.testing.assert_allclose(a, flat[path], atol=1e-6, rtol=1e-5,
                                 err_msg=jax.tree_util.keystr(path))
  if backbone == "res50":   # batch statistics came from every frame
    assert jax.tree_util.tree_leaves(bs1)
    return
  # Without batch statistics the pipeline loads frame 0 alone
  # (`train.clip_frames`): a T=1 batch takes the same step.
  config = _config(backbone, True)
  assert train.clip_frames(config, build_model(config)) == 1
  first = {k: v[:, :1] if v.ndim > 1 else v for k, v in batch.items()}
  p0, _, s0 = _step(config, first)
  _assert_same_stats(s0, s1)
  flat = dict(jax.tree_util.tree_leaves_with_path(p1))
  for path, a in jax.tree_util.tree_leaves_with_path(p0):
    np.testing.assert_allclose(a, flat[path], atol=1e-6, rtol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_clip_frames_keeps_every_frame_a_statistic_or_loss_sees():
  for backbone, first_only, one in (("pvt2", True, True), ("res50", True, False),
                                    ("pvt2", False, False)):
    config = _config(backbone, first_only)
    assert config.data.num_frames > 1
    assert train.clip_frames(config, build_model(config)) == (
        1 if one else config.data.num_frames)


def test_first_frame_only_refuses_data_supervising_later_frames():
  config = _config("pvt2", True)
  batch = random_batch(config, clips=2)
  train.check_supervision(batch, config)          # frame 0 only: fine
  batch["gt_flag"][1, 1] = 1.0
  with pytest.raises(ValueError, match="first_frame_only"):
    train.check_supervision(batch, config)
  train.check_supervision(batch, _config("pvt2", False))


def test_one_device_step_makes_no_all_reduce():
  """On one device the gradient psum would be an all-reduce that only copies
  every gradient (77 ms of the CPU S4 train step): the lowered step holds
  none (PVTv2 has no batch norm, whose statistics are averaged by flax).
  Several devices keep it: test_trainer's one-vs-four run checks values."""
  config = _config("pvt2", True)
  mesh = train.make_mesh(jax.devices()[:1])
  model = avsegformer.build_model(config, axis_name=train.AXIS)
  state = train.replicate(train.create_train_state(
      config, build_model(config), jax.random.PRNGKey(0)), mesh)
  batch = train.shard_batch(random_batch(config, clips=1), mesh)
  steps = train.Steps(model, config, mesh)
  for text in (steps._train.lower(state, batch).as_text(),
               steps._eval.lower({"params": state.params}, batch).as_text()):
    assert "all_reduce" not in text and "all-reduce" not in text


def test_accumulated_steps_equal_one_step_of_their_batches():
  """`train.grad_accum_steps=2` over two batches of 2 clips updates the
  parameters as one step over the 4 clips (S4's one supervised frame per
  clip: the same loss normalisation), and not at all after the first."""
  config = _config("pvt2", True)
  batch = random_batch(config, clips=4)
  halves = [{k: v[i:i + 2] for k, v in batch.items()} for i in (0, 2)]
  mesh = train.make_mesh(jax.devices()[:1])
  model = avsegformer.build_model(config, axis_name=train.AXIS)
  start = train.create_train_state(config, build_model(config),
                                   jax.random.PRNGKey(0))

  def run(config, batches):
    steps = train.Steps(model, config, mesh)
    state = train.replicate(train.create_train_state(
        config, build_model(config), jax.random.PRNGKey(0)), mesh)
    out = []
    with jax.default_matmul_precision("highest"):
      for b in batches:
        state, _ = steps.train(state, train.shard_batch(b, mesh))
        out.append(jax.device_get(state.params))
    return out

  (whole,) = run(config, [batch])
  config.train.grad_accum_steps = 2
  first, second = run(config, halves)
  flat = lambda p: dict(jax.tree_util.tree_leaves_with_path(p))  # noqa: E731
  p0, p1, p2, pw = map(flat, (start.params, first, second, whole))
  moved = 0
  for k in p0:
    np.testing.assert_array_equal(p1[k], p0[k], err_msg=str(k))
    np.testing.assert_allclose(p2[k], pw[k], rtol=0, atol=1e-6,
                               err_msg=str(k))
    moved += not np.array_equal(pw[k], p0[k])
  assert moved > len(p0) // 2
