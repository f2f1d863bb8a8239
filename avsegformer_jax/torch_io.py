"""Read PyTorch `.pth` files without torch, and without trusting them.

A `.pth` file is a pickle, and unpickling runs whatever callables the file
names, so `pickle.load` on a downloaded checkpoint runs the downloader's code.
Here the pickle goes through an unpickler whose `find_class` knows only the
handful of globals that rebuild tensors and plain containers; any other name
raises `UnsafeCheckpointError` before anything is called. Tensors come back as
numpy arrays (strides, offsets and shared storages respected; bfloat16 and
float8 widened to float32).

Formats:
  zip (torch >= 1.6): `<prefix>/data.pkl` holds the object, each storage is
    the record `<prefix>/data/<key>`, `<prefix>/byteorder` says its byte order.
  legacy (torch < 1.6, or `_use_new_zipfile_serialization=False`): one stream
    of pickles (magic number, protocol 1001, sys_info, the object, the list of
    storage keys), then each storage as little-endian int64 numel + raw data.
The pre-1.0 tar format and TorchScript archives are refused with a message.
"""
from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import ml_dtypes
import numpy as np

from etils import epath

from avsegformer_jax import errors, files

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype of its elements (little endian).
_STORAGE_DTYPES = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2",
    "BFloat16Storage": "bfloat16", "LongStorage": "<i8", "IntStorage": "<i4",
    "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1",
    "BoolStorage": "?", "ComplexFloatStorage": "<c8",
    "ComplexDoubleStorage": "<c16", "UntypedStorage": "u1",
}
# torch.<dtype> globals (rebuild v3 names the dtype; storage is untyped).
_TORCH_DTYPES = {
    "float64": "<f8", "float32": "<f4", "float16": "<f2",
    "bfloat16": "bfloat16", "int64": "<i8", "int32": "<i4", "int16": "<i2",
    "int8": "i1", "uint8": "u1", "bool": "?", "complex64": "<c8",
    "complex128": "<c16", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
    "float8_e4m3fn": "float8_e4m3fn", "float8_e5m2": "float8_e5m2",
    "float8_e4m3fnuz": "float8_e4m3fnuz", "float8_e5m2fnuz": "float8_e5m2fnuz",
}
# Narrow float types numpy lacks: (raw storage dtype, ml_dtypes type).
_WIDENED = {"bfloat16": ("<u2", ml_dtypes.bfloat16),
            "float8_e4m3fn": ("u1", ml_dtypes.float8_e4m3fn),
            "float8_e5m2": ("u1", ml_dtypes.float8_e5m2),
            "float8_e4m3fnuz": ("u1", ml_dtypes.float8_e4m3fnuz),
            "float8_e5m2fnuz": ("u1", ml_dtypes.float8_e5m2fnuz)}


class TorchFileError(errors.InputError):
  """A file that is not a readable PyTorch checkpoint (message names it)."""


class UnsafeCheckpointError(TorchFileError):
  """The pickle names a global outside the allow-list (it could run code)."""


@dataclasses.dataclass(frozen=True)
class _DType:
  """torch.XStorage / torch.<dtype> as the pickle names it (frozen, so a
  malicious BUILD opcode cannot alter it)."""
  name: str          # key of _STORAGE_DTYPES values / _WIDENED

  @property
  def raw(self) -> np.dtype:
    return np.dtype(_WIDENED[self.name][0] if self.name in _WIDENED
                    else self.name)


@dataclasses.dataclass(frozen=True, eq=False)
class _Storage:
  """A storage named by a persistent id; data is read after unpickling."""
  key: str
  dtype: _DType
  numel: int
  view_offset: int = 0                   # legacy storage views, in elements
  view_numel: int | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class _TensorRef:
  """A tensor to build once its storage's bytes are known."""
  storage: _Storage
  offset: int
  size: tuple
  stride: tuple
  dtype: _DType
  metadata: Any = None


def _ints(name, value):
  value = tuple(value)
  if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
             for v in value):
    raise TypeError(f"tensor {name} must be non-negative ints, got {value}")
  return value


def _rebuild_tensor(storage, storage_offset, size, stride):
  if not isinstance(storage, _Storage):
    raise TypeError(f"tensor storage must be a storage, got {type(storage)}")
  (offset,) = _ints("offset", (storage_offset,))
  size, stride = _ints("size", size), _ints("stride", stride)
  if len(size) != len(stride):
    raise TypeError(f"tensor size {size} and stride {stride} differ in rank")
  return _TensorRef(storage, offset, size, stride, storage.dtype)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, metadata=None):
  del requires_grad, backward_hooks
  ref = _rebuild_tensor(storage, storage_offset, size, stride)
  return dataclasses.replace(ref, metadata=metadata)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad,
                       backward_hooks, dtype, metadata=None):
  if not isinstance(dtype, _DType):
    raise TypeError(f"tensor dtype must be a torch dtype, got {dtype!r}")
  ref = _rebuild_tensor_v2(storage, storage_offset, size, stride,
                           requires_grad, backward_hooks, metadata)
  return dataclasses.replace(ref, dtype=dtype)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
  del requires_grad, backward_hooks, state
  return data                          # a Parameter is its tensor here


def _encode(text, encoding="latin1"):
  """Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1')."""
  if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
    raise TypeError(f"_codecs.encode only for latin1 text, got {encoding!r}")
  return text.encode("latin1")


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _encode,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("builtins", "bytearray"): bytearray,
    ("torch.storage", "UntypedStorage"): _DType("u1"),
}
_ALLOWED.update({("torch", k): _DType(v) for k, v in _STORAGE_DTYPES.items()})
_ALLOWED.update({("torch", k): _DType(v) for k, v in _TORCH_DTYPES.items()})


class _Unpickler(pickle.Unpickler):
  """Allow-list unpickler; storages are recorded, not read, while loading."""

  def __init__(self, file, path: str, legacy: bool):
    super().__init__(file, encoding="utf-8")
    self._path, self._legacy = path, legacy
    self.storages: dict[str, _Storage] = {}

  def find_class(self, module, name):
    obj = _ALLOWED.get((module, name))
    if obj is None:
      raise UnsafeCheckpointError(
          f"{self._path}: refusing global '{module}.{name}': only tensors, "
          "storages and plain containers may be loaded (a pickle that names "
          "other globals can run code; save a plain state_dict instead)")
    return obj

  def persistent_load(self, pid):
    if isinstance(pid, tuple) and pid and pid[0] in ("module", b"module"):
      raise UnsafeCheckpointError(
          f"{self._path}: holds a pickled nn.Module (torch.save(model)); "
          "only state dicts can be read: torch.save(model.state_dict(), f)")
    n_fields = 6 if self._legacy else 5
    if (not isinstance(pid, tuple) or len(pid) != n_fields
        or pid[0] not in ("storage", b"storage")
        or not isinstance(pid[1], _DType)):
      raise TorchFileError(f"{self._path}: unknown persistent id {pid!r:.80}")
    dtype, key, numel = pid[1], str(pid[2]), pid[4]
    _ints("storage size", (numel,))
    root = self.storages.get(key)
    if root is None:
      root = self.storages[key] = _Storage(key, dtype, numel)
    elif root.dtype != dtype:
      raise TorchFileError(f"{self._path}: storage {key} read as two dtypes")
    view = pid[5] if self._legacy else None
    if view is None:
      return root
    _, offset, view_numel = view
    _ints("storage view", (offset, view_numel))
    return _Storage(key, dtype, numel, offset, view_numel)


def _read_zip(f, path: str):
  try:
    zf = zipfile.ZipFile(f)
  except (zipfile.BadZipFile, OSError) as e:
    raise TorchFileError(f"{path}: not a readable zip archive ({e}); the "
                         "file may be truncated") from None
  with zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pkls) != 1:
      kind = ("a TorchScript archive (torch.jit.save)"
              if any("/code/" in n for n in names) else "not a torch.save file")
      raise TorchFileError(f"{path}: zip archive without a single "
                           f"<name>/data.pkl: {kind}")
    prefix = pkls[0][:-len("data.pkl")]
    order = "little"
    if prefix + "byteorder" in names:
      order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
      if order not in ("little", "big"):
        raise TorchFileError(f"{path}: unknown byteorder record {order!r}")
    try:
      data_pkl = zf.read(pkls[0])
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise TorchFileError(f"{path}: cannot read {pkls[0]} ({e})") from None
    unpickler = _Unpickler(io.BytesIO(data_pkl), path, legacy=False)
    obj = _unpickle(unpickler, path)
    buffers = {}
    for key, st in unpickler.storages.items():
      record = f"{prefix}data/{key}"
      try:
        raw = zf.read(record)
      except KeyError:
        raise TorchFileError(f"{path}: storage record {record} is missing "
                             "from the archive") from None
      except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise TorchFileError(f"{path}: cannot read {record} ({e}); the file "
                             "may be truncated") from None
      buffers[key] = _as_array(raw, st, order, path)
  return obj, buffers


def _read_legacy(f, path: str):
  head = lambda what: _unpickle(_Unpickler(f, path, legacy=True), path, what)
  if head("magic number") != LEGACY_MAGIC:
    raise TorchFileError(f"{path}: a pickle, but not a torch.save file "
                         "(wrong magic number)")
  if head("protocol version") != LEGACY_PROTOCOL:
    raise TorchFileError(f"{path}: unsupported legacy protocol version")
  head("sys_info")               # storages are little-endian regardless
  unpickler = _Unpickler(f, path, legacy=True)
  obj = _unpickle(unpickler, path)
  keys = head("storage keys")
  if not isinstance(keys, list):
    raise TorchFileError(f"{path}: storage key list is not a list")
  here = f.tell()
  size = f.seek(0, os.SEEK_END)
  f.seek(here)
  buffers = {}
  for key in keys:
    st = unpickler.storages.get(str(key))
    if st is None:
      raise TorchFileError(f"{path}: storage {key} has data but no tensor")
    count = f.read(8)
    if len(count) < 8:
      raise TorchFileError(f"{path}: truncated before storage {key}")
    (numel,) = struct.unpack("<q", count)
    nbytes = numel * st.dtype.raw.itemsize
    if numel != st.numel or nbytes > size - f.tell():
      raise TorchFileError(
          f"{path}: storage {key} holds {numel} elements, expected "
          f"{st.numel}, {size - f.tell()} bytes left: truncated or corrupt")
    buffers[str(key)] = _as_array(f.read(nbytes), st, "little", path)
  return obj, buffers


def _unpickle(unpickler, path, what="object"):
  try:
    return unpickler.load()
  except TorchFileError:
    raise
  except Exception as e:  # noqa: BLE001 - any failure here is a bad file
    raise TorchFileError(f"{path}: cannot unpickle the {what} "
                         f"({type(e).__name__}: {e}); truncated or not a "
                         "PyTorch file") from None


def _as_array(raw: bytes, st: _Storage, order: str, path: str) -> np.ndarray:
  dt = st.dtype.raw.newbyteorder("<" if order == "little" else ">")
  if len(raw) < st.numel * dt.itemsize:
    raise TorchFileError(f"{path}: storage {st.key} has {len(raw)} bytes, "
                         f"needs {st.numel * dt.itemsize}: truncated")
  return np.frombuffer(raw, dt, count=st.numel).astype(
      dt.newbyteorder("="), copy=False)


def _materialize(ref: _TensorRef, buffers, path) -> np.ndarray:
  st = ref.storage
  data = buffers.get(st.key)
  if data is None:
    raise TorchFileError(f"{path}: no data for storage {st.key}")
  if st.view_numel is not None:
    if st.view_offset + st.view_numel > data.size:
      raise TorchFileError(f"{path}: storage view outside storage {st.key}")
    data = data[st.view_offset:st.view_offset + st.view_numel]
  raw = ref.dtype.raw
  if raw != data.dtype:           # v3: typed view of an untyped (byte) storage
    if data.dtype != np.uint8 or data.size % raw.itemsize:
      raise TorchFileError(f"{path}: storage {st.key} is not bytes of "
                           f"{ref.dtype.name}")
    data = data.view(raw)
  if 0 in ref.size:
    out = np.zeros(ref.size, raw)
  else:
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.size, ref.stride))
    if last >= data.size:
      raise TorchFileError(
          f"{path}: tensor (offset {ref.offset}, size {ref.size}, stride "
          f"{ref.stride}) reads past the end of storage {st.key} "
          f"({data.size} elements)")
    out = np.lib.stride_tricks.as_strided(
        data[ref.offset:], ref.size,
        tuple(s * raw.itemsize for s in ref.stride), writeable=False).copy()
  if ref.dtype.name in _WIDENED:
    out = out.view(_WIDENED[ref.dtype.name][1]).astype(np.float32)
  meta = ref.metadata if isinstance(ref.metadata, dict) else {}
  if meta.get("neg"):
    out = -out
  if meta.get("conj"):
    out = np.conj(out)
  return out


def _resolve(obj, buffers, path, depth=0):
  """Replace every _TensorRef in plain containers by its numpy array."""
  if depth > 100:
    raise TorchFileError(f"{path}: containers nested too deeply")
  if isinstance(obj, _TensorRef):
    return _materialize(obj, buffers, path)
  if isinstance(obj, _Storage):
    return _materialize(_TensorRef(obj, 0, (obj.view_numel or obj.numel,),
                                   (1,), obj.dtype), buffers, path)
  rec = lambda v: _resolve(v, buffers, path, depth + 1)
  if isinstance(obj, dict):      # an OrderedDict stays an OrderedDict
    return type(obj)((k, rec(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(rec(v) for v in obj)
  return obj


def load(path) -> Any:
  """The object a `.pth` file holds, tensors as numpy arrays."""
  path = os.fspath(path)
  try:      # a local file or a URL (gs://: a pod's hosts share a bucket)
    f = epath.Path(files.absolute(path)).open("rb")
  except OSError as e:
    raise TorchFileError(f"{path}: cannot open "
                         f"({e.strerror or type(e).__name__})") from None
  with f:
    head = f.read(512)
    f.seek(0)
    if head[:4] == b"PK\x03\x04":
      obj, buffers = _read_zip(f, path)
    elif head[:2] == b"\x80\x02" or head[:1] in (b"\x80", b"("):
      obj, buffers = _read_legacy(f, path)
    elif head[257:262] == b"ustar":
      raise TorchFileError(f"{path}: a tar archive (torch < 0.4 format); "
                           "load and re-save it with a current torch")
    else:
      raise TorchFileError(f"{path}: not a PyTorch file (neither a zip "
                           "archive nor a pickle stream)")
  return _resolve(obj, buffers, path)


STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "module",
                   "net", "network", "weights")


def load_state_dict(path) -> dict[str, np.ndarray]:
  """{name: array} from a `.pth` state dict, unwrapping the usual nestings:
  {'state_dict': ...} / {'model': ...} / ..., and DataParallel's `module.`
  prefix. Non-tensor entries (epoch counters, ...) are dropped."""
  path = os.fspath(path)
  obj = load(path)
  seen = []
  while isinstance(obj, dict) and not any(
      isinstance(v, np.ndarray) for v in obj.values()):
    seen.append(list(obj)[:8])
    inner = next((obj[k] for k in STATE_DICT_KEYS
                  if isinstance(obj.get(k), dict)), None)
    if inner is None:
      break
    obj = inner
  if not isinstance(obj, dict):
    raise TorchFileError(f"{path}: holds a {type(obj).__name__}, not a "
                         "state dict")
  sd = {str(k): v for k, v in obj.items() if isinstance(v, np.ndarray)}
  if not sd:
    raise TorchFileError(f"{path}: no tensors found (keys seen: "
                         f"{seen or list(obj)[:8]})")
  while sd and all(k.startswith("module.") for k in sd):
    sd = {k[len("module."):]: v for k, v in sd.items()}
  return sd
