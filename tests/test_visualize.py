import numpy as np
import pytest
from PIL import Image

from avsegformer_jax import visualize


def test_palette_is_voc():
  p = visualize.palette(71)
  assert p.shape == (71, 3) and p.dtype == np.uint8
  assert p[:9].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0],
                            [0, 0, 128], [128, 0, 128], [0, 128, 128],
                            [128, 128, 128], [64, 0, 0]]
  assert len({tuple(c) for c in p}) == 71      # decodable: all distinct


def test_denormalise_inverts_imagenet_normalisation():
  rgb = np.random.RandomState(0).randint(0, 256, (4, 5, 3)).astype(np.uint8)
  x = (rgb / 255.0 - visualize.MEAN) / visualize.STD
  np.testing.assert_array_equal(visualize.denormalise(x.astype(np.float32)), rgb)


def test_overlay_touches_only_foreground_and_files(tmp_path):
  frame = np.full((2, 6, 6, 3), 100, np.uint8)
  logits = np.full((2, 6, 6, 1), -5.0, np.float32)
  logits[0, :3, :3] = 5.0
  out = visualize.overlay(frame[0], visualize.predict_mask(logits[0]), 1)
  assert (out[3:, 3:] == 100).all() and (out[:3, :3] != 100).any()
  paths = visualize.save_clip(str(tmp_path), "clip/a", frame, logits, 1,
                              valid=np.array([True, False]))
  assert sorted(p.rsplit("/", 1)[1] for p in paths) == ["0_mask.png",
                                                         "0_overlay.png"]
  mask = np.asarray(Image.open(paths[0] if "mask" in paths[0] else paths[1]))
  assert mask[:3, :3].min() == 255 and mask[3:, 3:].max() == 0


def test_semantic_masks_use_the_palette():
  logits = np.zeros((1, 2, 2, 71), np.float32)
  logits[0, 0, 0, 5] = 1.0
  m = visualize.predict_mask(logits)[0]
  assert m[0, 0] == 5 and m[1, 1] == 0
  img = visualize.mask_image(m, 71)        # AVSBench's AVSS label format
  assert img.mode == "P" and np.asarray(img)[0, 0] == 5
  assert np.asarray(img.convert("RGB"))[0, 0].tolist() == \
      visualize.palette()[5].tolist()


def test_overlay_is_the_rounded_blend():
  """(1 - a) * frame + a * colour rounded on the foreground, the frame
  elsewhere; alpha 0.5 (the default) runs in integers and must give
  floor((frame + colour + 1) / 2) exactly, as the float form does."""
  rng = np.random.default_rng(0)
  frame = rng.integers(0, 256, (40, 50, 3), np.uint8)
  for num_classes, mask in (
      (1, (rng.random((40, 50)) > 0.6).astype(np.uint8)),
      (71, np.where(rng.random((40, 50)) > 0.6,
                    rng.integers(1, 71, (40, 50)), 0).astype(np.uint8))):
    colour = (np.array([255, 40, 40], np.int64) if num_classes == 1
              else visualize.palette(71)[mask].astype(np.int64))
    fg = (mask > 0)[..., None]
    f = frame.astype(np.int64)
    half = np.where(fg, (f + colour + 1) // 2, f)
    np.testing.assert_array_equal(
        visualize.overlay(frame, mask, num_classes), half)
    got = visualize.overlay(frame, mask, num_classes, 0.3).astype(np.float64)
    blend = np.where(fg, 0.7 * f + 0.3 * colour, f)
    assert np.abs(got - blend).max() <= 0.5 + 1e-4


def test_png_writer_runs_writes_and_reports_a_failure(tmp_path):
  w = visualize.PngWriter(workers=2)
  for i in range(10):
    w.submit(visualize.save_mask_png, str(tmp_path / f"{i}.png"),
             np.full((4, 4), i % 2, np.uint8), 1)
  w.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      f"{i}.png" for i in range(10))
  assert np.asarray(Image.open(tmp_path / "1.png")).min() == 255
  w = visualize.PngWriter(workers=2)
  w.submit(visualize.save_rgb_png, str(tmp_path / "no" / "dir.png"),
           np.zeros((4, 4, 3), np.uint8))
  try:
    w.close()
  except FileNotFoundError:
    pass
  else:
    raise AssertionError("the failed write was not raised")


@pytest.mark.parametrize("num_classes", [1, 71])
def test_saved_masks_read_back_as_avsbench_labels(tmp_path, num_classes):
  """An evaluation's <t>_mask.png is what AVSBench stores (0/255 grey;
  class indices with the palette): the dataset's own label reading gives
  back the predicted class map. (RGB masks lost AVSS's class indices.)"""
  from datasets.avsbench import raw  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 6, 8, num_classes).astype(np.float32)
  frames = np.zeros((2, 6, 8, 3), np.uint8)
  paths = visualize.save_clip(str(tmp_path), "c", frames, logits, num_classes)
  want = visualize.predict_mask(logits)
  assert len(np.unique(want)) > 1
  for t in range(2):
    im = Image.open(tmp_path / "c" / f"{t}_mask.png")
    if num_classes == 1:
      got = np.asarray(im.convert("1"), np.uint8)   # as raw.load_clip reads
    else:
      assert np.asarray(im).tolist() == want[t].tolist()
      got = raw.colours_to_classes(np.asarray(im.convert("RGB")),
                                   raw.avss_palette(), "p")
    np.testing.assert_array_equal(got, want[t])
  assert len(paths) == 4
