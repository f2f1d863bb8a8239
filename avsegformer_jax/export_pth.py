"""Flax variables -> the original's state dict, saved as a `.pth` it loads.

Why: a model trained or fine-tuned here should go back to the original's
code (its `scripts/*/test.py` read a checkpoint with torch.load and a
strict `load_state_dict`) and to anyone who holds torch checkpoints. `convert`'s inverse:

  kernel [kh, kw, I, O] -> weight [O, I, kh, kw]     (conv)
  kernel [I, O]         -> weight [O, I], or [O, I, 1, 1] where the original
                           has a 1x1 convolution (CONV_1X1 below)
  q_proj, k_proj, v_proj -> in_proj_weight / in_proj_bias  (torch MHA)
  embedding, scale      -> weight;  batch_stats mean / var -> running_*

Stacked layers (model.scan_layers) are unrolled first. What the original
holds but never uses for its outputs (convert.KNOWN_UNUSED: the FPN and
`attn_fc` it builds and skips, ResNet's second branch) is written as zeros,
and every batch norm gets `num_batches_tracked` 0, so that the strict load
finds exactly its own keys and shapes (tests check them against the
reference state-dict lists of all six released models).

The file is torch's zip format (what `torch.save` writes since 1.6: a
protocol-2 pickle of an OrderedDict of tensors, one storage per tensor),
spelled without torch; torch.load reads it with `weights_only=True`.
"""
from __future__ import annotations

import collections
import os
import re
import struct
import tempfile
import zipfile
from typing import Mapping

import numpy as np
from etils import epath
from flax import traverse_util

from avsegformer_jax import convert, files

# Flax Dense layers that are 1x1 Conv2d in the original: its weight is
# [O, I, 1, 1] (torch names, matched after the layer index is dropped).
CONV_1X1 = (
    re.compile(r"^head\.mlp\.layers\.\d+\.weight$"),
)
_QKV = ("q_proj", "k_proj", "v_proj")
_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}
_STORAGE = {np.dtype(np.float32): "FloatStorage",
            np.dtype(np.float16): "HalfStorage",
            np.dtype(np.int64): "LongStorage",
            np.dtype(np.bool_): "BoolStorage"}


class ExportError(convert.ConversionError):
  """Variables that do not make the original's state dict."""


def _torch_module(path: tuple[str, ...]) -> str:
  """('head', 'in_proj_0_1') -> 'head.in_proj.0.1' (convert.flax_module_path
  backwards); B2_ResNet's branch modules keep theirs: `layer3_1.0`."""
  name = ".".join(re.sub(r"_(\d+)", r".\1", p) for p in path)
  return re.sub(r"^backbone\.layer([34])\.([12])\.", r"backbone.layer\1_\2.",
                name)


def state_dict(variables: Mapping, config) -> dict[str, np.ndarray]:
  """The original's state dict (name -> float32 / int64 array) for the
  variables of `build_model(config)`, in either layer layout."""
  from avsegformer_jax import avsegformer, checkpoint
  mc = config.model if "model" in config else config
  unrolled = mc.copy_and_resolve_references()
  unrolled.scan_layers = False
  variables = checkpoint.fit_variables(
      variables, avsegformer.variable_shapes(avsegformer.build_model(unrolled)),
      "variables", "They are not this config's model.")
  out: dict[str, np.ndarray] = {}
  qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
  for col in ("params", "batch_stats"):
    for key, a in traverse_util.flatten_dict(variables.get(col) or {}).items():
      a = np.asarray(a, np.float32)
      mod, leaf = _torch_module(key[:-1]), key[-1]
      if col == "batch_stats":
        out[f"{mod}.running_{leaf}"] = a
        out[f"{mod}.num_batches_tracked"] = np.zeros((), np.int64)
        continue
      if key[-2] in _QKV:
        qkv.setdefault((_torch_module(key[:-2]), leaf), {})[key[-2]] = a
        continue
      name = f"{mod}.{_LEAF.get(leaf, leaf)}"
      if leaf == "kernel":
        a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
        if any(p.match(name) for p in CONV_1X1):
          a = a[:, :, None, None]
      out[name] = np.asarray(a, order="C")
  for (mod, leaf), parts in qkv.items():
    if set(parts) != set(_QKV):        # plain Linear layers (the mixer's)
      for n, a in parts.items():
        out[f"{mod}.{n}.{_LEAF.get(leaf, leaf)}"] = np.asarray(
            a.T if leaf == "kernel" else a, order="C")
    elif leaf == "kernel":
      out[f"{mod}.in_proj_weight"] = np.concatenate(
          [parts[n].T for n in _QKV], 0)
    else:
      out[f"{mod}.in_proj_bias"] = np.concatenate([parts[n] for n in _QKV])
  out.update(unused_zeros(out, num_classes=mc.num_classes,
                          backbone=mc.backbone, embed_dim=mc.embed_dim))
  return out


def unused_zeros(sd: Mapping[str, np.ndarray], *, num_classes: int,
                 backbone: str, embed_dim: int) -> dict[str, np.ndarray]:
  """Zeros for the original's never-used parameters (convert.KNOWN_UNUSED),
  shaped as its AVSegHead and B2_ResNet build them."""
  z = lambda *s: np.zeros(s, np.float32)                   # noqa: E731
  out = {}
  for i in (1, 2, 3):                   # SimpleFPN(channel=256), fixed width
    out[f"head.fpn.up{i}.1.weight"] = z(256, 256, 3, 3)
    out[f"head.fpn.up{i}.1.bias"] = z(256)
  out.update({"head.attn_fc.0.weight": z(128, embed_dim, 3, 3),
              "head.attn_fc.0.bias": z(128),
              "head.attn_fc.2.weight": z(32, 128, 3, 3),
              "head.attn_fc.2.bias": z(32),
              "head.attn_fc.4.weight": z(num_classes, 32, 1, 1)})
  if backbone == "res50":               # branch 2 is built like branch 1
    for name, a in sd.items():
      m = re.match(r"^backbone\.layer([34])_1\.(.*)$", name)
      if m:
        out[f"backbone.layer{m.group(1)}_2.{m.group(2)}"] = np.zeros_like(a)
  assert all(convert.is_known_unused(k) for k in out), sorted(out)
  return out


def export(config, checkpoint: str, out: str) -> dict:
  """Any checkpoint of the model (ours: export, workdir, step; or a `.pth`)
  -> the original's `.pth` at `out`. Returns counts for the report."""
  from avsegformer_jax import pretrained
  mc = config.model if "model" in config else config
  variables = pretrained.load_model_variables(checkpoint, config)
  sd = state_dict(variables, config)
  save(out, sd)
  unused = sum(convert.is_known_unused(k) and not k.endswith("tracked")
               for k in sd)
  return {"tensors": len(sd), "unused_zeros": unused,
          "backbone": mc.backbone, "num_classes": mc.num_classes}


# --------------------------------------------------------------- .pth file --
def _str(text: str) -> bytes:
  raw = text.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw     # BINUNICODE


def _int(v: int) -> bytes:
  return b"\x8a\x08" + struct.pack("<q", v)           # LONG1, 8 bytes


def _tensor_pickle(key: str, a: np.ndarray) -> bytes:
  """torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, {})
  with the storage as a persistent id, as torch.save spells it."""
  ints = lambda xs: b"(" + b"".join(_int(x) for x in xs) + b"t"  # noqa: E731
  storage = (b"(" + _str("storage") + b"ctorch\n"
             + _STORAGE[a.dtype].encode() + b"\n" + _str(key) + _str("cpu")
             + _int(a.size) + b"tQ")                  # BINPERSID
  strides = [s // a.itemsize for s in a.strides] if a.ndim else []
  return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _int(0)
          + ints(a.shape) + ints(strides)
          + b"\x89ccollections\nOrderedDict\n)RtR")   # NEWFALSE, {} hooks


def _aligned(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
  """A stored record whose data starts at a multiple of 64 bytes, as torch's
  writer pads them (padding in an 'FB' extra field)."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  start = zf.fp.tell() + 30 + len(name.encode()) + 4
  info.extra = b"FB" + struct.pack("<H", -start % 64) + b"Z" * (-start % 64)
  zf.writestr(info, data)


def save(path: str, sd: Mapping[str, np.ndarray]) -> None:
  """Writes `sd` as torch.save(OrderedDict(sd), path) would; atomically
  (a temporary file renamed into place, or uploaded whole to a `gs://`
  URL), so a killed export leaves no half-written `.pth`."""
  if files.is_url(path):
    with tempfile.TemporaryDirectory() as d:
      save(os.path.join(d, "model.pth"), sd)
      epath.Path(os.path.join(d, "model.pth")).copy(epath.Path(path),
                                                    overwrite=True)
    return
  arrays = collections.OrderedDict(
      (k, np.asarray(v, np.asarray(v).dtype.newbyteorder("<"), order="C"))
      for k, v in sd.items())
  for k, a in arrays.items():
    if a.dtype not in _STORAGE:
      raise ExportError(f"{k}: dtype {a.dtype} has no torch storage here")
  body = b"".join(
      [b"\x80\x02ccollections\nOrderedDict\n)R("]
      + [_str(k) + _tensor_pickle(str(i), a)
         for i, (k, a) in enumerate(arrays.items())] + [b"u."])
  archive = "archive"                 # the records' folder, any name
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
      _aligned(zf, f"{archive}/data.pkl", body)
      _aligned(zf, f"{archive}/.format_version", b"1")
      _aligned(zf, f"{archive}/.storage_alignment", b"64")
      _aligned(zf, f"{archive}/byteorder", b"little")
      for i, a in enumerate(arrays.values()):
        _aligned(zf, f"{archive}/data/{i}", a.tobytes())
      _aligned(zf, f"{archive}/version", b"3\n")
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
