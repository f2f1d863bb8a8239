"""Times the ORIGINAL PyTorch AVSegFormer on this machine, as the issue did.

Run with a Python that has torch (not this project's environment; see
benchmarks/README.md, "The original on the same machine"):

  python benchmarks/original/time_original.py --src ~/AVSegFormer \
      --backbone res50 --mode eval --reps 3

Protocol: float32, `torch.set_num_threads(2)`, B = 1 clip, T = 5 frames,
224 x 224, random inputs, one untimed warm-up, then `--reps` timed calls.

- `eval`: `model.eval()`, under `no_grad` the per-batch body of the
  original's `scripts/s4/test.py`: forward, `mask_iou`, `Eval_Fmeasure`
  (forward and metric timed apart: our eval step computes both).
- `train_frozen` / `train_unfrozen`: one iteration of `scripts/s4/train.py`'s
  loop: forward, `IouSemanticAwareLoss`, `LossUtil.add_loss`, `zero_grad`,
  backward, its AdamW step; frozen is the original's `freeze_backbone(True)`
  (`requires_grad=False` only, batch norm stays in train mode).
- `parity`: the golden inputs (T = 2) against shared/reference's stored
  outputs, to show this is the code the goldens came from; with
  `--weights=X.pth`, the weights from that file (an export of ours).

Prints each call's seconds, the median, the peak RSS and one JSON line.
"""
import argparse
import contextlib
import io
import json
import os
import resource
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import env  # noqa: E402


def _peak_rss_mib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _parity(args):
  import numpy as np
  import torch
  model, _ = env.build(args.src, args.reference, args.backbone,
                       weights=args.weights)
  model.eval()
  g = np.load(os.path.join(args.reference, "goldens",
                           f"model_s4_{args.backbone}.npz"))
  with torch.no_grad():
    pred, mask_feature = model(torch.from_numpy(g["audio"]),
                               torch.from_numpy(g["frames"]))
  diff = lambda a, ref: float(np.abs(a.numpy() - ref).max())  # noqa: E731
  return {"pred_max_abs_diff": diff(pred, g["pred"]),
          "pred_max_abs": float(np.abs(g["pred"]).max()),
          "mask_feature_max_abs_diff": diff(mask_feature, g["mask_feature"])}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--src", required=True,
                 help="checkout of vvvb-github/AVSegFormer")
  p.add_argument("--reference", default=os.path.join(
      os.path.dirname(__file__), "..", "..", "..", "shared", "reference"),
                 help="shared/reference (synth_weights.py, goldens/)")
  p.add_argument("--backbone", choices=sorted(env.CONFIGS), required=True)
  p.add_argument("--mode", choices=["eval", "train_frozen", "train_unfrozen",
                                    "parity"], required=True)
  p.add_argument("--weights", default=None,
                 help="a .pth to load instead of the synthetic weights (parity "
                 "of an export: the golden's weights through our convert "
                 "and export_pth)")
  p.add_argument("--reps", type=int, default=3)
  p.add_argument("--frames", type=int, default=5)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--threads", type=int, default=2)
  args = p.parse_args()
  args.reference = os.path.abspath(args.reference)
  env.setup(args.src, args.reference)
  import torch
  torch.set_num_threads(args.threads)
  torch.manual_seed(123)  # drives dropout / drop path, like train.py's seed
  out = {"impl": "original", "torch": torch.__version__,
         "backbone": args.backbone, "mode": args.mode,
         "threads": torch.get_num_threads()}
  if args.mode == "parity":
    out.update(_parity(args))
    print(json.dumps(out))
    return

  from loss import IouSemanticAwareLoss        # scripts/s4/loss.py
  from utility import Eval_Fmeasure, mask_iou  # scripts/s4/utility.py
  from utils import pyutils
  from utils.loss_util import LossUtil
  model, cfg = env.build(args.src, args.reference, args.backbone)
  model = torch.nn.DataParallel(model)  # as the scripts; on CPU a pass-through
  n, s = args.frames, args.size
  g = torch.Generator().manual_seed(0)
  frames = torch.randn(n, 3, s, s, generator=g)   # [B*T, 3, S, S], B = 1
  audio = torch.randn(n, 1, 96, 64, generator=g)  # log-mel examples
  parts = []  # (forward [+ backward + update], metric) seconds per call
  if args.mode == "eval":
    model.eval()
    mask = (torch.rand(n, s, s, generator=g) > 0.5).float()

    def step():
      with torch.no_grad():
        t0 = time.perf_counter()
        logits, _ = model(audio, frames)
        t1 = time.perf_counter()
        mask_iou(logits.squeeze(1), mask)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints
          Eval_Fmeasure(logits.squeeze(1), mask)
        return t1 - t0, time.perf_counter() - t1
  else:
    model.module.freeze_backbone(args.mode == "train_frozen")
    model.train()
    optimizer = pyutils.get_optimizer(model, cfg.optimizer)
    losses = LossUtil(**cfg.loss)
    mask = (torch.rand(1, s, s, generator=g) > 0.5).float()  # first frame

    def step():
      t0 = time.perf_counter()
      logits, mask_feature = model(audio, frames)
      loss, loss_dict = IouSemanticAwareLoss(
          logits, mask_feature, mask.unsqueeze(1).unsqueeze(1), **cfg.loss)
      losses.add_loss(loss, loss_dict)
      optimizer.zero_grad()
      loss.backward()
      optimizer.step()
      return time.perf_counter() - t0, 0.0

  step()  # warm-up (AdamW creates its state here)
  for i in range(args.reps):
    a, b = step()
    parts.append((a, b))
    print(f"call {i}: {a + b:.3f} s" + (f" (forward {a:.3f} + metric {b:.3f})"
                                         if args.mode == "eval" else ""),
          flush=True)
  times = [a + b for a, b in parts]
  out.update(frames=n, size=s, reps=args.reps, seconds=times,
             median_s=statistics.median(times), peak_rss_mib=_peak_rss_mib())
  if args.mode == "eval":
    out["median_forward_s"] = statistics.median(a for a, _ in parts)
  print(f"median {out['median_s']:.3f} s; peak RSS {out['peak_rss_mib']:.0f} MiB")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
