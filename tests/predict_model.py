"""The small model the predict end-to-end test trains, and its evaluation.

  python tests/predict_model.py [--steps N]   # train, then IoU on two videos

Training the whole AVSegFormer inside a test would cost minutes of
compilation and hundreds of steps on a 2-core CPU, so the test trains only
`audio_proj` + `head` of a narrow demo-like model (32 px): the PVTv2-B0
backbone and VGGish keep a random initialisation (numpy RandomState), and
VGGish's embeddings of a small bank of sounds are computed once and fed in
place of its output. It learns in ~100 steps of ~0.2 s (batch 12), which
the test can afford (~2 min on 2 busy cores, most of it compilation).

Training data: frames showing the three objects of the synthetic video's
classes (circle 300 Hz, square 520 Hz, triangle 900 Hz) each in a random
quadrant at a random spot, on random backgrounds; one of them sounds; the
target is its mask. So the model must tie each sound to its object's look,
not to a place, and the test video (other positions, objects drifting,
H.264/AAC-compressed, decoded by predict) is new to it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from avsegformer_jax import audio as audio_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from avsegformer_jax import predict, synthetic_video  # pylint: disable=wrong-import-position
from datasets.avsbench import synthesize  # pylint: disable=wrong-import-position

TRAINED = ("audio_proj", "head")
CLASSES = synthetic_video.DEFAULT_CLASSES
FROZEN_SEED = 1234


def config():
  """The demo's model, narrower, at 32 px, T = 5."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config()
  m = c.model
  m.embed_dim = 32
  m.num_heads = 4
  m.encoder_ffn_dim = m.decoder_ffn_dim = m.query_ffn_dim = 64
  m.num_queries = 8
  m.head_mlp_dim = 32
  c.data.image_size = 32
  c.data.num_frames = 5
  return c


def frozen_variables(model, seed=FROZEN_SEED):
  """Every variable, drawn with RandomState: kernels N(0, g/fan_in) (g = 2
  in VGGish's ReLU stack, 1 elsewhere), norm scales 1, biases 0."""
  import jax  # pylint: disable=g-import-not-at-top
  from avsegformer_jax import avsegformer  # pylint: disable=g-import-not-at-top
  shapes = avsegformer.variable_shapes(model, 32)
  rs = np.random.RandomState(seed)

  def fill(path, sds):
    name, shape = path[-1].key, tuple(sds.shape)
    if name in ("scale", "var"):
      return np.ones(shape, np.float32)
    if name in ("bias", "mean"):
      return np.zeros(shape, np.float32)
    gain = 2.0 if path[1].key == "vggish" else 1.0
    fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    std = np.sqrt(gain / fan_in) if name == "kernel" else 0.02
    return (rs.standard_normal(shape) * std).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def example(rng, cls):
  """One log-mel example [96, 64] of class `cls`'s sound (fresh 1 s)."""
  clip = {"sample_rate": 16000, "duration": 1.0, "sounding": [int(cls)],
          "channels": 1}
  y = synthesize._audio(rng, clip)  # pylint: disable=protected-access
  return audio_lib.waveform_to_examples(y, 16000)[0]


def training_frame(rng, cls, video_size=64, size=32):
  """(frame [size,size,3] normalised as predict does, mask [size,size])."""
  clip = synthetic_video._plan(rng, CLASSES, 2, video_size)  # pylint: disable=protected-access
  t = int(rng.integers(0, 2))
  texture = synthesize._texture(rng, video_size, video_size)  # pylint: disable=protected-access
  img = synthesize._render(rng, clip, t, texture)  # pylint: disable=protected-access
  obj = [o for o in clip["objects"] if o["cls"] == cls][0]
  m = synthesize.object_mask(obj, t, video_size, video_size)
  mask = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize(
      (size, size), Image.BILINEAR)) > 127
  return predict.preprocess(img, size), mask.astype(np.int32)


def train(cfg, steps, batch=12, lr=1e-3, seed=0, bank=8, log=print):
  """Trains `audio_proj` + `head` (backbone and VGGish frozen). VGGish
  embeddings of a bank of sounds are computed once and fed in place of
  VGGish's output (flax method interception), which makes steps ~3x
  cheaper; the model code is otherwise the real one."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from avsegformer_jax import avsegformer, losses, vggish  # pylint: disable=g-import-not-at-top
  model = avsegformer.build_model(cfg)
  rng = np.random.default_rng(seed)
  params = dict(frozen_variables(model)["params"])
  frozen = {k: v for k, v in params.items() if k not in TRAINED}
  trainable = {k: params[k] for k in TRAINED}
  mels = np.stack([example(rng, c) for c in CLASSES for _ in range(bank)])
  emb_bank = jax.jit(lambda p, x: model.vggish.apply({"params": p}, x))(
      frozen["vggish"], mels).reshape(len(CLASSES), bank, -1)
  tx = optax.adamw(lr, weight_decay=0.01)
  opt = tx.init(trainable)
  size = cfg.data.image_size

  def loss_fn(tr, frames, emb, labels):
    def swap(next_fun, args, kwargs, ctx):
      if isinstance(ctx.module, vggish.VGGish) and ctx.method_name == "__call__":
        return emb
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(swap):
      logits, mf = model.apply({"params": {**frozen, **tr}}, frames,
                               jnp.zeros((frames.shape[0], 96, 64)))
    main, mix = losses.per_frame_losses(logits, mf, labels, "dice")
    return jnp.mean(main) + 0.1 * jnp.mean(mix)

  @jax.jit
  def step(tr, opt, frames, emb, labels):
    loss, g = jax.value_and_grad(loss_fn)(tr, frames, emb, labels)
    upd, opt = tx.update(g, opt, tr)
    return optax.apply_updates(tr, upd), opt, loss

  t0 = time.time()
  for i in range(steps):
    cls = [int(rng.integers(0, len(CLASSES))) for _ in range(batch)]
    fm = [training_frame(rng, CLASSES[c], size=size) for c in cls]
    emb = emb_bank[np.array(cls), rng.integers(0, bank, batch)]
    trainable, opt, loss = step(trainable, opt, np.stack([f for f, _ in fm]),
                                emb, np.stack([m for _, m in fm]))
    if i % 20 == 0 or i == steps - 1:
      log(f"step {i} loss {float(loss):.4f} ({time.time() - t0:.0f} s)")
  return trainable


def evaluate(cfg, variables, workdir, seed=0):
  """predict on a fresh synthetic video -> (sounding IoU, best silent IoU)."""
  video = synthetic_video.write(os.path.join(workdir, f"eval_{seed}.mp4"),
                                size=64, seed=seed)
  out = os.path.join(workdir, f"pred_{seed}")
  summary = predict.predict(cfg, video.path, out, variables=variables,
                            progress=False)
  return sounding_vs_silent_iou(summary, out, video), summary


def sounding_vs_silent_iou(summary, out_dir, video):
  """Mean over sampled frames of the predicted mask's IoU with the object
  sounding then, and of its best IoU with a silent object."""
  sounding, silent = [], []
  for rec in summary["frames"]:
    pred = np.asarray(Image.open(os.path.join(
        out_dir, "masks", f"{rec['index']:05d}.png"))) > 127
    cls = video.sounding(rec["time"])
    iou = {c: (pred & m).sum() / max((pred | m).sum(), 1)
           for c, m in video.object_masks(rec["source_frame"]).items()}
    sounding.append(iou[cls])
    silent.append(max(v for c, v in iou.items() if c != cls))
  return float(np.mean(sounding)), float(np.mean(silent))


def trained_variables(cfg, steps=150, log=None):
  """All variables of the model after `train`."""
  from avsegformer_jax import avsegformer  # pylint: disable=g-import-not-at-top
  variables = frozen_variables(avsegformer.build_model(cfg))
  variables["params"] = {**variables["params"],
                         **train(cfg, steps, log=log or (lambda m: None))}
  return variables


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--workdir", default="/tmp/predict_model")
  a = p.parse_args()
  os.makedirs(a.workdir, exist_ok=True)
  cfg = config()
  t0 = time.time()
  variables = trained_variables(cfg, a.steps, log=print)
  print(f"trained in {time.time() - t0:.0f} s")
  for seed in (0, 1):
    (snd, sil), s = evaluate(cfg, variables, a.workdir, seed)
    print(f"video seed {seed}: IoU sounding {snd:.3f}, best silent {sil:.3f}; "
          f"{s['frames_per_s_model']} frames/s in the model")


if __name__ == "__main__":
  main()
