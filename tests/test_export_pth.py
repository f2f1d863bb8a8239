"""export_pth: our variables -> the original's state dict and `.pth`.

Checked against the reference state-dict lists of the six released models
(every key, shape and dtype the original's strict `load_state_dict` wants),
through our own reader and converter back to the same variables in both
layer layouts, and byte layout against a file real torch wrote. With torch
at hand (in this interpreter or $TORCH_PYTHON), tests/check_torch_roundtrip.py
also loads an export into torch and compares every tensor.
"""
import importlib
import os
import pickletools
import struct
import zipfile

import jax
import numpy as np
import pytest

from avsegformer_jax import (avsegformer, checkpoint, convert, export_pth,
                             pretrained, torch_io)
from configs import tiny

HERE = os.path.dirname(__file__)
TINY = os.path.join(HERE, "..", "configs", "tiny.py")


def _reference(task, backbone):
  """{name: (shape, dtype)} of the original's state dict."""
  out = {}
  path = os.path.join(HERE, "reference", f"state_dict_{task}_{backbone}.tsv")
  for line in open(path):
    name, shape, dtype = line.rstrip("\n").split("\t")
    out[name] = (tuple(int(x) for x in shape.strip("[]").split(",") if x),
                 dtype)
  return out


def _random_variables(config, seed=0):
  rng = np.random.default_rng(seed)
  shapes = avsegformer.variable_shapes(avsegformer.build_model(config))
  return jax.tree_util.tree_map(
      lambda s: rng.standard_normal(s.shape, np.float32), shapes)


@pytest.mark.parametrize("task,backbone", [
    ("s4", "res50"), ("s4", "pvt2"), ("ms3", "res50"), ("ms3", "pvt2"),
    ("avss", "res50"), ("avss", "pvt2")])
def test_state_dict_has_the_originals_keys_shapes_and_dtypes(task, backbone):
  """Full-size models: exactly the keys the original's strict load wants."""
  config = importlib.import_module(f"configs.{task}").get_config(backbone)
  shapes = avsegformer.variable_shapes(avsegformer.build_model(config))
  zeros = jax.tree_util.tree_map(   # no memory: broadcast views
      lambda s: np.broadcast_to(np.float32(0), s.shape), shapes)
  sd = export_pth.state_dict(zeros, config)
  got = {k: (tuple(a.shape), str(a.dtype)) for k, a in sd.items()}
  want = _reference(task, backbone)
  assert sorted(set(got) ^ set(want)) == []
  assert {k: got[k] for k in want if got[k] != want[k]} == {}


@pytest.mark.parametrize("backbone,scan", [("pvt2", True), ("res50", False)])
def test_pth_converts_back_to_the_same_variables(tmp_path, backbone, scan):
  """variables -> .pth -> torch_io -> convert: bit for bit, from either
  layer layout into the other; the unused parameters are zeros."""
  config = tiny.get_config(backbone)
  config.model.scan_layers = scan
  want = _random_variables(config)
  sd = export_pth.state_dict(want, config)
  path = str(tmp_path / "model.pth")
  export_pth.save(path, sd)
  back = torch_io.load_state_dict(path)
  assert list(back) == list(sd)
  for k, a in sd.items():
    assert back[k].dtype == a.dtype and np.array_equal(back[k], a), k
  unused = [k for k in sd if convert.is_known_unused(k)]
  assert unused and all(not sd[k].any() for k in unused)
  if backbone == "res50":
    counters = [k for k in sd if k.endswith(".num_batches_tracked")]
    assert len(counters) == 53 + 29 and all(     # branch 2: 29 more
        sd[k].dtype == np.int64 and sd[k].shape == () for k in counters)
    assert "backbone.layer3_2.5.bn3.running_var" in sd
  other = tiny.get_config(backbone)
  other.model.scan_layers = not scan
  got, report = convert.torch_to_flax(back, other, return_report=True)
  assert sorted(report["unused"]) == sorted(unused)
  shapes = avsegformer.variable_shapes(avsegformer.build_model(other))
  want = checkpoint.fit_variables(want, shapes, "want")
  for col in ("params", "batch_stats"):
    a, b = got.get(col) or {}, want.get(col) or {}
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
  assert (backbone == "res50") == bool(want["batch_stats"])


def _records(path):
  """(name, data offset) of each zip record, read from the local headers."""
  raw = open(path, "rb").read()
  for info in zipfile.ZipFile(path).infolist():
    n, e = struct.unpack("<HH", raw[info.header_offset + 26:
                                    info.header_offset + 30])
    yield info.filename, info.header_offset + 30 + n + e


def test_file_is_laid_out_as_torch_writes_it(tmp_path):
  """Records as torch 2.x names and aligns them (64 bytes: what
  torch.load(mmap=True) maps), a valid protocol-2 pickle, little-endian."""
  sd = {"a.weight": np.arange(6, dtype=np.float32).reshape(2, 3),
        "b.num_batches_tracked": np.zeros((), np.int64),
        "c": np.ones((3,), np.float16)}
  path = str(tmp_path / "x.pth")
  export_pth.save(path, sd)
  ours = dict(_records(path))
  theirs = dict(_records(os.path.join(HERE, "fixtures", "torch",
                                      "zip_module.pth")))
  assert all(off % 64 == 0 for off in ours.values())
  assert all(off % 64 == 0 for off in theirs.values())   # torch does too
  strip = lambda names: {n.split("/", 1)[1] for n in names  # noqa: E731
                         if "/data/" not in n and "serialization" not in n}
  assert strip(ours) == strip(theirs)
  with zipfile.ZipFile(path) as zf:
    assert zf.read("archive/version") == b"3\n"
    assert zf.read("archive/byteorder") == b"little"
    pickletools.dis(zf.read("archive/data.pkl"), out=open(os.devnull, "w"))
    assert zf.read("archive/data/0") == sd["a.weight"].tobytes()
  back = torch_io.load_state_dict(path)
  for k, a in sd.items():
    assert back[k].dtype == a.dtype and np.array_equal(back[k], a)


def test_save_is_atomic(tmp_path):
  """A failed save leaves neither the file nor a temporary; a good one
  replaces the old file whole."""
  path = tmp_path / "m.pth"
  export_pth.save(str(path), {"w": np.ones(2, np.float32)})
  with pytest.raises(export_pth.ExportError, match="x: dtype complex64"):
    export_pth.save(str(path), {"w": np.zeros(2, np.float32),
                                "x": np.zeros(2, np.complex64)})
  assert sorted(os.listdir(tmp_path)) == ["m.pth"]
  np.testing.assert_array_equal(torch_io.load_state_dict(str(path))["w"],
                                np.ones(2, np.float32))


def test_convert_cli_exports_a_workdir_checkpoint(tmp_path, capsys):
  """`convert --checkpoint=<ours> --out=X.pth`: one line of report; a
  missing checkpoint is one error line, nothing written."""
  config = tiny.get_config("pvt2")
  want = _random_variables(config, seed=3)
  checkpoint.save_variables(tmp_path / "export", want)
  out = tmp_path / "trained.pth"
  with pytest.raises(SystemExit) as e:
    pretrained.cli_main(["convert", f"--config={TINY}:pvt2",
                         f"--checkpoint={tmp_path / 'export'}",
                         f"--out={out}"])
  assert e.value.code == 0
  printed = capsys.readouterr().out
  sd = torch_io.load_state_dict(str(out))
  n_unused = sum(convert.is_known_unused(k) for k in sd)
  assert f"{len(sd)} tensors, the original's state dict ({n_unused} it " \
         "holds but never uses, as zeros)" in printed
  # Read back as eval and predict read a released .pth.
  got = pretrained.load_model_variables(str(out), config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got["params"],
                         want["params"])
  with pytest.raises(SystemExit) as e:
    pretrained.cli_main(["convert", f"--config={TINY}:pvt2",
                         f"--checkpoint={tmp_path / 'nope'}",
                         f"--out={tmp_path / 'x.pth'}"])
  assert "nope: no such checkpoint" in str(e.value.code)
  assert not (tmp_path / "x.pth").exists()
  with pytest.raises(SystemExit) as e:      # ours, but --out=DIR
    pretrained.cli_main(["convert", f"--config={TINY}:pvt2",
                         f"--checkpoint={tmp_path / 'export'}",
                         f"--out={tmp_path / 'again'}"])
  assert "export: a directory, and --out=DIR takes a released .pth; to " \
         "write a checkpoint of ours in the original's format, give " \
         "--out=FILE.pth" in str(e.value.code)
  # A full disk (tried on a tmpfs): the OSError names no file; we do.
  import errno  # pylint: disable=g-import-not-at-top
  from avsegformer_jax import export_pth  # pylint: disable=g-import-not-at-top
  def full(*args):
    raise OSError(errno.ENOSPC, "No space left on device")
  with pytest.MonkeyPatch.context() as m:
    m.setattr(export_pth, "export", full)
    with pytest.raises(SystemExit) as e:
      pretrained.cli_main(["convert", f"--config={TINY}:pvt2",
                           f"--checkpoint={tmp_path / 'export'}",
                           f"--out={tmp_path / 'full.pth'}"])
  assert e.value.code == f"convert: {tmp_path / 'full.pth'}: No space left " \
      "on device"


def test_convert_to_pth_takes_the_checkpoints_own_config(tmp_path):
  """Without --config, ours -> .pth takes the config the checkpoint was made
  with (its config.json); a released .pth holds none, so the other way
  needs --config, and says so in one line."""
  import subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  config = tiny.get_config("pvt2")
  config.model.num_queries = 4          # not tiny.py's: read from the export
  want = _random_variables(config, seed=4)
  checkpoint.save_variables(tmp_path / "export", want, config=config)

  def convert_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "avsegformer_jax.convert", *args],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True, text=True, timeout=600)
  r = convert_cli(f"--checkpoint={tmp_path / 'export'}",
                  f"--out={tmp_path / 'x.pth'}")
  assert r.returncode == 0, r.stderr[-3000:]
  got = pretrained.load_model_variables(str(tmp_path / "x.pth"), config)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got["params"],
                         want["params"])
  r = convert_cli(f"--checkpoint={tmp_path / 'x.pth'}",
                  f"--out={tmp_path / 'back'}")
  assert r.returncode == 1 and r.stderr.strip().splitlines()[-1] == (
      "convert: --config is needed to convert a released .pth (it holds "
      "none), e.g. --config=configs/s4.py:pvt2"), r.stderr[-3000:]
