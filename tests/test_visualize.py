import numpy as np
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
  assert visualize.colourise(m, 71)[0, 0].tolist() == visualize.palette()[5].tolist()
