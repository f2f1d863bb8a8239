"""torch_io: `.pth` files read without torch, and never trusted.

Real torch-written files: tests/fixtures/torch/*.pth (made by
make_fixtures.py there, torch 2.13.0; the expected arrays are torch's own
`.numpy()` in the `.npz` beside each). Hostile and broken files are crafted
here from raw pickle opcodes.
"""
import io
import os
import pickle
import pickletools
import struct
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from avsegformer_jax import torch_io
from avsegformer_jax.torch_io import TorchFileError, UnsafeCheckpointError

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "torch")
FILES = ("zip_nested", "legacy_nested", "zip_module", "legacy_module")


@pytest.mark.parametrize("name", FILES)
def test_torch_written_files_match_torch(name):
  sd = torch_io.load_state_dict(os.path.join(FIX, name + ".pth"))
  ref = np.load(os.path.join(FIX, name + ".npz"))
  assert sorted(sd) == sorted(ref.files)           # 'module.' stripped too
  for k in ref.files:
    assert sd[k].dtype == ref[k].dtype and sd[k].shape == ref[k].shape, k
    np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)


def test_views_and_dtypes_are_rebuilt_exactly():
  for name in ("zip_nested", "legacy_nested"):
    sd = torch_io.load_state_dict(os.path.join(FIX, name + ".pth"))
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    np.testing.assert_array_equal(sd["transposed"], base.T)
    np.testing.assert_array_equal(sd["strided"], base[1:, 1::2])
    shared = np.arange(10, dtype=np.float32) * 0.5
    np.testing.assert_array_equal(sd["shared_b"], shared[3:7])
    sd["shared_b"][0] = -1          # arrays own their memory
    assert sd["shared_a"][3] == 1.5
    assert sd["bf16"].dtype == np.float32 and sd["empty"].shape == (0, 3)
    assert sd["scalar"].shape == () and sd["scalar"] == 2.5
    np.testing.assert_array_equal(sd["conj"], [1 - 2j, -3 + 0.5j])
    assert sd["i64"][1, 0] == 2**40 and sd["bool"].dtype == np.bool_
  sd = torch_io.load_state_dict(os.path.join(FIX, "zip_nested.pth"))
  np.testing.assert_array_equal(sd["u16"], np.array([1, 65535, 300], np.uint16))


def test_load_keeps_plain_entries_and_order():
  obj = torch_io.load(os.path.join(FIX, "legacy_nested.pth"))
  assert obj["epoch"] == 3 and obj["best_miou"] == 0.5 and obj["note"] == "x"
  assert obj["lrs"] == [1e-3, 2e-4] and obj["flags"] == (True, None)
  assert list(obj["state_dict"])[:2] == ["module.f32", "module.f16"]
  msd = torch_io.load(os.path.join(FIX, "zip_module.pth"))
  assert list(msd) == ["0.weight", "0.bias", "1.weight", "1.bias",
                       "1.running_mean", "1.running_var",
                       "1.num_batches_tracked", "3.weight", "3.bias"]
  assert msd["1.num_batches_tracked"] == 7


# ------------------------------------------------------------ hostile files --
class _Evil:
  """Pickles as posix.system('touch <target>') (os.system on Linux)."""

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.system, (f"touch {self.target}",))


def _legacy_stream(obj_pickle: bytes) -> bytes:
  head = b"".join(pickle.dumps(x, protocol=2) for x in (
      torch_io.LEGACY_MAGIC, torch_io.LEGACY_PROTOCOL,
      {"protocol_version": 1001, "little_endian": True}))
  return head + obj_pickle + pickle.dumps([], protocol=2)


def _zip(path, data_pkl: bytes, records=None):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", data_pkl)
    zf.writestr("archive/byteorder", "little")
    for k, v in (records or {}).items():
      zf.writestr(f"archive/data/{k}", v)


@pytest.mark.parametrize("layout", ["bare", "legacy", "zip", "nested"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, layout):
  target = tmp_path / "pwned"
  evil = pickle.dumps(_Evil(target), protocol=2)
  # The payload really is a call of posix.system (shown without running it).
  ops = [(op.name, arg) for op, arg, _ in pickletools.genops(evil)]
  assert ("GLOBAL", f"{os.system.__module__} system") in ops
  assert ("REDUCE", None) in ops
  path = tmp_path / "model.pth"
  if layout == "bare":
    path.write_bytes(evil)
  elif layout == "legacy":
    path.write_bytes(_legacy_stream(evil))
  elif layout == "zip":
    _zip(path, evil)
  else:      # inside an otherwise ordinary nested state dict
    payload = pickle.dumps({"epoch": 1, "state_dict": {"w": _Evil(target)}},
                           protocol=2)
    path.write_bytes(_legacy_stream(payload))
  with pytest.raises(UnsafeCheckpointError) as e:
    torch_io.load_state_dict(path)
  assert f"'{os.system.__module__}.system'" in str(e.value)
  assert str(path) in str(e.value)
  assert not target.exists()


@pytest.mark.parametrize("module,name", [
    ("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"),
    ("torch.nn.modules.conv", "Conv2d"), ("numpy", "load"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy")])
def test_every_other_global_is_refused_by_name(tmp_path, module, name):
  path = tmp_path / "x.pth"
  _zip(path, b"\x80\x02c" + f"{module}\n{name}\n".encode() + b")R.")
  with pytest.raises(UnsafeCheckpointError, match=f"'{module}.{name}'"):
    torch_io.load(path)


# -------------------------------------------------------- crafted tensors ----
def _int(v):
  return b"J" + struct.pack("<i", v)


def _tensor_pickle(size, stride, offset, numel, key="0"):
  """{'w': tensor} the way torch writes it, from raw protocol-2 opcodes."""
  s = lambda t: b"X" + struct.pack("<I", len(t)) + t.encode()
  tup = lambda xs: b"(" + b"".join(_int(x) for x in xs) + b"t"
  storage = (b"(" + s("storage") + b"ctorch\nFloatStorage\n" + s(key)
             + s("cpu") + _int(numel) + b"tQ")
  return (b"\x80\x02}" + s("w") + b"ctorch._utils\n_rebuild_tensor_v2\n("
          + storage + _int(offset) + tup(size) + tup(stride)
          + b"\x89ccollections\nOrderedDict\n)Rt" + b"Rs.")


def test_crafted_tensor_round_trip(tmp_path):
  data = np.arange(12, dtype="<f4")
  path = tmp_path / "ok.pth"
  _zip(path, _tensor_pickle((2, 3), (1, 4), 1, 12), {"0": data.tobytes()})
  np.testing.assert_array_equal(torch_io.load_state_dict(path)["w"],
                                [[1, 5, 9], [2, 6, 10]])


def test_view_outside_its_storage_is_refused(tmp_path):
  path = tmp_path / "bad.pth"
  data = np.arange(12, dtype="<f4").tobytes()
  _zip(path, _tensor_pickle((3, 4), (4, 1), 2, 12), {"0": data})
  with pytest.raises(TorchFileError, match="past the end of storage 0"):
    torch_io.load_state_dict(path)


def test_missing_and_short_storage_records(tmp_path):
  path = tmp_path / "missing.pth"
  _zip(path, _tensor_pickle((2,), (1,), 0, 2))
  with pytest.raises(TorchFileError, match="archive/data/0 is missing"):
    torch_io.load_state_dict(path)
  _zip(path, _tensor_pickle((4,), (1,), 0, 4), {"0": b"\0" * 8})
  with pytest.raises(TorchFileError, match="truncated"):
    torch_io.load_state_dict(path)


# ----------------------------------------------------------- broken files ----
def _cut(src, dst, frac):
  with open(src, "rb") as f:
    raw = f.read()
  dst.write_bytes(raw[:int(len(raw) * frac)])
  return dst


@pytest.mark.parametrize("name", ["zip_nested", "legacy_nested"])
@pytest.mark.parametrize("frac", [0.1, 0.5, 0.97])
def test_truncated_files_name_the_file(tmp_path, name, frac):
  path = _cut(os.path.join(FIX, name + ".pth"), tmp_path / "cut.pth", frac)
  with pytest.raises(TorchFileError, match=str(path)):
    torch_io.load_state_dict(path)


def test_not_a_checkpoint(tmp_path):
  cases = {
      "missing.pth": None,
      "text.pth": b"hello, I am not a checkpoint\n" * 4,
      "plain_pickle.pth": pickle.dumps({"a": 1}, protocol=2),
      "no_tensors.pth": _legacy_stream(pickle.dumps({"epoch": 3}, 2)),
      "a_list.pth": _legacy_stream(pickle.dumps([1, 2], 2)),
  }
  expected = {"missing.pth": "cannot open", "text.pth": "not a PyTorch file",
              "plain_pickle.pth": "wrong magic number",
              "no_tensors.pth": "no tensors found",
              "a_list.pth": "holds a list"}
  for fname, raw in cases.items():
    path = tmp_path / fname
    if raw is not None:
      path.write_bytes(raw)
    with pytest.raises(TorchFileError, match=expected[fname]) as e:
      torch_io.load_state_dict(path)
    assert str(path) in str(e.value)
  zpath = tmp_path / "scripted.pth"
  with zipfile.ZipFile(zpath, "w") as zf:
    zf.writestr("m/code/__torch__.py", "")
    zf.writestr("m/constants.pkl", b"")
  with pytest.raises(TorchFileError, match="TorchScript"):
    torch_io.load(zpath)
  tpath = tmp_path / "old.pth"
  with tarfile.open(tpath, "w") as tf:
    tf.addfile(tarfile.TarInfo("storages"), io.BytesIO(b""))
  with pytest.raises(TorchFileError, match="tar archive"):
    torch_io.load(tpath)


# -------------------------------------- real torch round trip (optional) ----
@pytest.mark.golden
@pytest.mark.slow
def test_torch_roundtrip_reproduces_golden(tmp_path):
  """A .pth that torch wrote from the golden's synthetic weights converts and
  reproduces goldens/model_s4_res50.npz. Needs torch: in this interpreter, or
  another one named by $TORCH_PYTHON (see tests/check_torch_roundtrip.py)."""
  torch_python = os.environ.get("TORCH_PYTHON")
  if not torch_python:
    pytest.importorskip("torch")
  sys.path.insert(0, os.path.dirname(__file__))
  import check_torch_roundtrip
  errs = check_torch_roundtrip.roundtrip(str(tmp_path), torch_python)
  assert errs["pred"] <= 1e-4 and errs["mask_feature"] <= 1e-4, errs
  assert errs["vggish"] <= 1e-5, errs


def test_test_writer_matches_what_torch_wrote(tmp_path):
  """tests/pth_writer.py (used by other tests) reads back like torch's file."""
  sys.path.insert(0, os.path.dirname(__file__))
  from pth_writer import write_pth
  torch_sd = torch_io.load_state_dict(os.path.join(FIX, "zip_module.pth"))
  path = write_pth(tmp_path / "w.pth", torch_sd, nested=True,
                   prefix="module.")
  ours = torch_io.load_state_dict(path)
  assert list(ours) == list(torch_sd)
  for k, v in torch_sd.items():
    assert ours[k].dtype == v.dtype
    np.testing.assert_array_equal(ours[k], v)
