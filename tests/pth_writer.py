"""Write `.pth` files in torch's zip layout without torch, for tests.

Only what tests need: a flat {name: array} (float32 / float16 / int64 /
bool), each tensor contiguous in its own storage, optionally nested as
{'state_dict': ...}. The pickle is spelled with raw protocol-2 opcodes, as
torch writes it. tests/test_torch_io.py checks that torch_io reads these
exactly as it reads files real torch wrote.
"""
import struct
import zipfile

import numpy as np

_STORAGES = {np.dtype("float32"): "FloatStorage",
             np.dtype("float16"): "HalfStorage",
             np.dtype("int64"): "LongStorage", np.dtype("bool"): "BoolStorage"}


def _str(text):
  raw = text.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw


def _int(v):
  return b"\x8a\x08" + struct.pack("<q", v)         # LONG1, 8 bytes


def _tuple(xs):
  return b"(" + b"".join(_int(x) for x in xs) + b"t"


def _tensor(key, arr):
  storage = (b"(" + _str("storage") + b"ctorch\n"
             + _STORAGES[arr.dtype].encode() + b"\n" + _str(key)
             + _str("cpu") + _int(arr.size) + b"tQ")
  strides = [s // arr.itemsize for s in arr.strides]
  return (b"ctorch._utils\n_rebuild_tensor_v2\n(" + storage + _int(0)
          + _tuple(arr.shape) + _tuple(strides)
          + b"\x89ccollections\nOrderedDict\n)RtR")


def write_pth(path, state_dict, nested=False, prefix=""):
  """torch.save(OrderedDict(state_dict)) (or {'state_dict': ..., 'epoch': 1}
  when `nested`), names prefixed by `prefix` (e.g. 'module.')."""
  arrays = {prefix + k: np.ascontiguousarray(v) for k, v in state_dict.items()}
  body = b"ccollections\nOrderedDict\n)R("
  for i, (k, a) in enumerate(arrays.items()):
    body += _str(k) + _tensor(str(i), a)
  body += b"u"
  if nested:
    body = b"}(" + _str("state_dict") + body + _str("epoch") + _int(1) + b"u"
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr("archive/data.pkl", b"\x80\x02" + body + b".")
    zf.writestr("archive/byteorder", "little")
    for i, a in enumerate(arrays.values()):
      zf.writestr(f"archive/data/{i}", a.astype(a.dtype.newbyteorder("<"))
                  .tobytes())
  return str(path)
