"""PyTorch AVSegFormer state dict -> Flax variables.

The Flax modules are named after the original's parameters, so the mapping is
mechanical: a torch name's numeric parts are joined to the part before them
with "_" (`backbone.layer1.0.conv1.weight` -> `backbone/layer1_0/conv1/kernel`)
and the leaf is renamed and re-laid out by what the Flax side expects:

  weight [O, I, kh, kw] -> kernel [kh, kw, I, O]     (conv; 1x1 -> Dense if 2-D)
  weight [O, I]         -> kernel [I, O]             (linear)
  weight [N, D]         -> embedding [N, D]          (nn.Embed)
  weight [C]            -> scale                     (norms)
  running_mean / _var   -> batch_stats mean / var
  in_proj_weight / bias -> q_proj, k_proj, v_proj    (nn.MultiheadAttention)

Every torch key is either used or listed in KNOWN_UNUSED; every Flax leaf must
be filled. Anything else raises an error naming the key and both shapes.
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

import jax
import numpy as np
from flax import traverse_util

from avsegformer_jax import errors

# Parameters the original carries but never uses for its outputs (the port
# does not hold them): the unused FPN and attention head, and ResNet's second
# branch, which exists in B2_ResNet but never runs in AVSegFormer.
KNOWN_UNUSED = (
    re.compile(r"^head\.fpn\."),
    re.compile(r"^head\.attn_fc\."),
    re.compile(r"^backbone\.layer3_2\."),
    re.compile(r"^backbone\.layer4_2\."),
    re.compile(r".*\.num_batches_tracked$"),
)


class ConversionError(errors.InputError):
  """A state dict that does not fit the model (names the key and shapes)."""


def is_known_unused(name: str) -> bool:
  return any(p.match(name) for p in KNOWN_UNUSED)


def flax_module_path(torch_name: str) -> tuple[tuple[str, ...], str]:
  """`a.b.0.c.weight` -> (('a', 'b_0', 'c'), 'weight')."""
  parts = torch_name.split(".")
  leaf = parts.pop()
  path: list[str] = []
  for p in parts:
    if p.isdigit() and path:
      path[-1] = f"{path[-1]}_{p}"
    else:
      path.append(p)
  return tuple(path), leaf


def _targets(torch_name: str, arr: np.ndarray):
  """(collection, flax path, array) pairs that one torch tensor fills."""
  mod, leaf = flax_module_path(torch_name)
  if leaf in ("in_proj_weight", "in_proj_bias"):
    q, k, v = np.split(arr, 3, axis=0)
    suffix = "kernel" if leaf == "in_proj_weight" else "bias"
    for n, a in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
      yield "params", mod + (n, suffix), a.T if suffix == "kernel" else a
    return
  if leaf == "running_mean":
    yield "batch_stats", mod + ("mean",), arr
  elif leaf == "running_var":
    yield "batch_stats", mod + ("var",), arr
  elif leaf == "bias":
    yield "params", mod + ("bias",), arr
  elif leaf == "weight" and arr.ndim == 4:
    yield "params", mod + ("kernel",), arr.transpose(2, 3, 1, 0)
  elif leaf == "weight" and arr.ndim == 2:
    # Linear [O, I] -> kernel [I, O]; nn.Embed keeps [N, D] (resolved below).
    yield "params", mod + ("kernel",), arr.T
  elif leaf == "weight" and arr.ndim == 1:
    yield "params", mod + ("scale",), arr
  else:                      # raw parameters such as head.level_embed
    yield "params", mod + (leaf,), arr


def map_state_dict(
    state_dict: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    prefix: str = "",
    strict: bool = True,
    unused: Iterable[re.Pattern] = KNOWN_UNUSED,
) -> tuple[dict, dict[str, list[str]]]:
  """Fill a Flax variable tree shaped like `target` from torch tensors.

  Args:
    state_dict: torch name -> array (numpy or anything `np.asarray` takes).
    target: Flax variables (or `jax.eval_shape` of them), e.g.
      {'params': ..., 'batch_stats': ...}.
    prefix: only keys starting with it are used, with it stripped (e.g.
      "backbone." to load a backbone module on its own).
    strict: raise on unknown keys and on unfilled Flax leaves.
    unused: patterns (matched on the full torch name) of known-unused keys.

  Returns:
    (variables as numpy arrays, report with 'used', 'unused', 'unknown' keys)
  """
  unused = tuple(unused)
  flat_target = {}
  for col, tree in target.items():
    for path, leaf in traverse_util.flatten_dict(tree).items():
      flat_target[(col,) + path] = tuple(leaf.shape)
  out: dict[tuple, np.ndarray] = {}
  stacked: dict[tuple, np.ndarray] = {}     # nn.scan'ed layers, by stacked key
  filled: dict[tuple, set] = {}
  report = {"used": [], "unused": [], "unknown": []}
  for name, value in state_dict.items():
    if not name.startswith(prefix):
      continue
    if any(p.match(name) for p in unused):
      report["unused"].append(name)
      continue
    arr = np.asarray(value)
    short = name[len(prefix):]
    placed = False
    for col, path, a in _targets(short, arr):
      key = (col,) + path
      if key not in flat_target and path[-1] == "kernel" and arr.ndim == 2:
        alt = (col,) + path[:-1] + ("embedding",)
        if alt in flat_target:
          key, a = alt, arr          # nn.Embed: no transpose
      index = None
      if key not in flat_target:
        key, index = _stacked_key(key, flat_target, a.shape)
        if key is None:
          continue
      want = flat_target[key] if index is None else flat_target[key][1:]
      if a.shape != want and a.size == int(np.prod(want)) and (
          a.ndim == 4 and a.shape[:2] == (1, 1)):
        a = a.reshape(want)          # 1x1 conv weights held by nn.Dense
      if a.shape != want:
        raise ConversionError(
            f"{name}: torch shape {tuple(arr.shape)} -> Flax {'/'.join(key)} "
            f"expects {want}, got {a.shape}")
      if index is None:
        out[key] = np.asarray(a, dtype=np.float32)
      else:
        if key not in stacked:
          stacked[key] = np.zeros(flat_target[key], np.float32)
          filled[key] = set()
        stacked[key][index] = a
        filled[key].add(index)
      placed = True
    if placed:
      report["used"].append(name)
    else:
      report["unknown"].append(name)
  for key, arr in stacked.items():
    if len(filled[key]) == arr.shape[0]:
      out[key] = arr
  missing = sorted(set(flat_target) - set(out))
  if strict and report["unknown"]:
    k = report["unknown"][0]
    raise ConversionError(
        f"{len(report['unknown'])} torch key(s) have no place in the model, "
        f"first: {k} shape {tuple(np.shape(state_dict[k]))} (Flax path "
        f"{'/'.join(flax_module_path(k[len(prefix):])[0])})")
  if strict and missing:
    key = missing[0]
    raise ConversionError(
        f"{len(missing)} Flax variable(s) not found in the state dict, first: "
        f"{'/'.join(key)} shape {flat_target[key]} (torch key "
        f"{prefix}{_torch_name_hint(key)} missing)")
  return traverse_util.unflatten_dict(out), report


def _stacked_key(key, flat_target, shape):
  """(..., 'layers_3', ...) -> ((..., 'layers', ...), 3) when the model holds
  those layers stacked for nn.scan; (None, None) otherwise."""
  for i, part in enumerate(key):
    m = re.fullmatch(r"(.+)_(\d+)", part)
    if not m:
      continue
    cand = key[:i] + (m.group(1),) + key[i + 1:]
    want = flat_target.get(cand)
    if want and int(m.group(2)) < want[0] and (
        want[1:] == tuple(shape) or math.prod(want[1:]) == math.prod(shape)):
      return cand, int(m.group(2))
  return None, None


def _torch_name_hint(key: tuple[str, ...]) -> str:
  col, *path = key
  leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight",
          "mean": "running_mean", "var": "running_var"}.get(path[-1], path[-1])
  mods = [re.sub(r"_(\d+)", r".\1", p) for p in path[:-1]]
  return ".".join(mods + [leaf])


def torch_to_flax(state_dict: Mapping[str, Any], config, *,
                  return_report: bool = False):
  """Variables for `build_model(config)` from the original's state dict."""
  from avsegformer_jax import avsegformer
  model = avsegformer.build_model(config)
  target = avsegformer.variable_shapes(model)
  variables, report = map_state_dict(state_dict, target)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  return (variables, report) if return_report else variables


def main(argv=None):
  """`python -m avsegformer_jax.convert --config=... --checkpoint=X.pth
  --out=DIR`, or `--checkpoint=<ours> --out=X.pth` (export_pth)."""
  from avsegformer_jax import pretrained
  return pretrained.cli_main(argv)


if __name__ == "__main__":
  main()
