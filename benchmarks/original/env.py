"""Builds the ORIGINAL AVSegFormer (PyTorch) on a CPU, for timing against ours.

Nothing of the original is copied here: `--src` points at a checkout of
vvvb-github/AVSegFormer, used unmodified. Three things are set around it, none
of which changes what it computes or what that costs:

- `shim/` goes first on `sys.path`, so its compiled deformable-attention op
  resolves to an empty module and the original falls back to its own
  pure-PyTorch core (what the goldens used).
- `torch.Tensor.cuda` returns the tensor: the S4 loss and metric move small
  index / threshold tensors with `.cuda()`; here they stay on the CPU.
- The config file (a plain Python module) is read with `runpy` instead of
  mmcv's `Config`, and pretrained files are not loaded (there are none here):
  the weights are shared/reference's synthetic ones, `load_state_dict(strict)`.
"""
import os
import runpy
import sys

CONFIGS = {"res50": "config/s4/AVSegFormer_res50_s4.py",
           "pvt2": "config/s4/AVSegFormer_pvt2_s4.py"}
KEYS = {"res50": "state_dict_s4_res50.tsv", "pvt2": "state_dict_s4_pvt2.tsv"}
HERE = os.path.dirname(os.path.abspath(__file__))


def setup(src, reference):
  """Puts the original, its S4 scripts, the shim and synth_weights on the path."""
  if not os.path.isfile(os.path.join(src, CONFIGS["res50"])):
    raise SystemExit(f"--src {src}: not a checkout of vvvb-github/AVSegFormer "
                     f"(no {CONFIGS['res50']})")
  if not os.path.isfile(os.path.join(reference, "synth_weights.py")):
    raise SystemExit(f"--reference {reference}: no synth_weights.py")
  for p in (os.path.join(src, "scripts", "s4"), src,
            os.path.join(HERE, "shim"), reference):
    if p not in sys.path:
      sys.path.insert(0, p)
  import torch
  torch.Tensor.cuda = lambda self, *a, **k: self


class _Attrs(dict):
  """mmcv's Config gives attribute access; the original's scripts use it."""

  def __getattr__(self, k):
    try:
      return self[k]
    except KeyError as e:
      raise AttributeError(k) from e


def _attrs(x):
  return _Attrs({k: _attrs(v) for k, v in x.items()}) if isinstance(x, dict) else x


def load_config(src, backbone):
  d = runpy.run_path(os.path.join(src, CONFIGS[backbone]))
  return _attrs({k: v for k, v in d.items() if not k.startswith("__")})


def build(src, reference, backbone, seed=0, weights=None):
  """(model, config) with shared/reference's synthetic weights of `seed`, or
  with the state dict in `weights` (a `.pth`, e.g. one that
  `avsegformer_jax.convert --out=X.pth` exported), loaded as the original's
  test scripts do: `torch.load`, strict `load_state_dict`."""
  import numpy as np
  import torch
  from model import build_model              # the original's
  from synth_weights import synth_state_dict  # shared/reference's
  cfg = load_config(src, backbone)
  m = dict(cfg.model)
  m["backbone"] = dict(m["backbone"], init_weights_path=None)
  # Only decides whether VGGish's checkpoint file is read; VGGish stays frozen
  # (AVSegFormer(freeze_audio_backbone=True), forward under no_grad).
  m["vggish"] = dict(m["vggish"], freeze_audio_extractor=False)
  model = build_model(**m)
  if weights:
    model.load_state_dict(torch.load(weights, weights_only=True), strict=True)
    return model, cfg
  sd = synth_state_dict(os.path.join(reference, KEYS[backbone]), seed=seed)
  model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                         for k, v in sd.items()}, strict=True)
  return model, cfg
