"""Parameter counts of the port, and of the original for comparison.

`python -m avsegformer_jax.param_count --config=configs/avss.py:res50`

The original's state dict also carries parameters that never influence its
outputs; the port does not hold them (see convert.KNOWN_UNUSED):
  head.fpn (3 conv3x3 256->256), head.attn_fc (a second `fc` for an unused
  attention-mask loss), and ResNet's second branch layer3_2/layer4_2 (same
  structure as layer3/layer4; B2_ResNet builds it, AVSegFormer never runs it).
Their sizes follow from the architecture, so the original's total is
reconstructed here without its key list; tests compare with the key lists.
"""
from __future__ import annotations

import math

import jax
from absl import app, flags
from flax import traverse_util

from avsegformer_jax import avsegformer, errors



def _size(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def count(config) -> dict[str, int]:
  """Float parameter counts: per top-level component, port and original."""
  mc = config.model if "model" in config else config
  model = avsegformer.build_model(config)
  params = avsegformer.variable_shapes(model)["params"]
  out = {f"port/{k}": _size(v) for k, v in params.items()}
  out["port/total"] = _size(params)
  c = mc.embed_dim
  unused = {
      "head.fpn": 3 * (c * c * 9 + c),
      "head.attn_fc": c * 128 * 9 + 128 + 128 * 32 * 9 + 32 + 32 * mc.num_classes,
  }
  if mc.backbone == "res50":
    flat = traverse_util.flatten_dict(params["backbone"])
    unused["backbone.layer3_2+layer4_2"] = sum(
        math.prod(v.shape) for k, v in flat.items()
        if k[0].startswith(("layer3_", "layer4_")))
  for k, v in unused.items():
    out[f"original_only/{k}"] = v
  out["original/total"] = out["port/total"] + sum(unused.values())
  return out


def main(argv):
  del argv
  for k, v in count(flags.FLAGS.config).items():
    print(f"{k:40s} {v:>14,d}")


if __name__ == "__main__":
  # Flags are defined here, not at import: the library modules share absl's
  # global flag registry, and two `--config` definitions collide.
  errors.define_config_flag("Model config file.")
  flags.mark_flags_as_required(["config"])
  app.run(main)
