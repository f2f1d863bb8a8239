"""files.py: workdir files at a local path or a gs:// URL. The bucket is a
stand-in: an fsspec "gcs" filesystem over a temporary folder, which is what
etils.epath hands gs:// paths to (gcsfs in real use)."""
import json
import os
import shutil

import fsspec
import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from avsegformer_jax import (checkpoint, compile_cache, files, run_log,
                             trainer, visualize)


class _Bucket(LocalFileSystem):
  """gs://BUCKET/KEY -> ROOT/BUCKET/KEY on the local disk."""
  root = "/nonexistent"
  protocol = ("gcs", "gs")

  def __init__(self, finalize_on_close=False, **kwargs):
    del finalize_on_close                  # gcsfs's option; epath passes it
    super().__init__(**kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for p in ("gs://", "gcs://"):
      if path.startswith(p):
        return os.path.join(cls.root, path[len(p):])
    return super()._strip_protocol(path)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  monkeypatch.setattr(_Bucket, "root", str(tmp_path / "gcs"))
  for name in ("gcs", "gs"):
    fsspec.register_implementation(name, _Bucket, clobber=True)
  fsspec.AbstractFileSystem.clear_instance_cache()
  yield tmp_path / "gcs"
  fsspec.AbstractFileSystem.clear_instance_cache()


def test_urls_stay_urls_and_local_paths_become_absolute(tmp_path,
                                                        monkeypatch):
  assert files.absolute("gs://b/run") == "gs://b/run"
  assert files.join("gs://b/run", "best", "3") == "gs://b/run/best/3"
  monkeypatch.chdir(tmp_path)
  assert files.absolute("run") == str(tmp_path / "run")
  assert files.join("run", "x") == str(tmp_path / "run" / "x")
  assert checkpoint._abs("gs://b/run") == "gs://b/run"   # not ./gs:/b/run


def test_logs_results_and_pngs_in_a_bucket(bucket, monkeypatch):
  monkeypatch.chdir(bucket.parent)
  wd = "gs://b/run"
  files.makedirs(wd)
  assert files.is_dir(wd) and (bucket / "b" / "run").is_dir()
  for step in (1, 2):                     # no appending to objects: rewrites
    run_log.append(wd, run_log.TRAIN_LOG, {"step": step})
  lines = (bucket / "b" / "run" / "train_metrics.jsonl").read_text()
  assert [json.loads(l)["step"] for l in lines.splitlines()] == [1, 2]
  files.write_text(files.join(wd, "r.json"), '{"miou": 0.5}')
  assert files.exists("gs://b/run/r.json")
  assert not files.exists("gs://b/run/missing.json")
  frames = np.zeros((2, 8, 8, 3), np.uint8)
  logits = np.zeros((2, 8, 8, 1), np.float32)
  logits[1, 2:5, 2:5] = 3.0
  written = visualize.save_clip(files.join(wd, "vis"), "clip/0", frames,
                                logits, 1, valid=[False, True])
  assert written == ["gs://b/run/vis/clip_0/1_mask.png",
                     "gs://b/run/vis/clip_0/1_overlay.png"]
  mask = np.asarray(Image.open(bucket / "b/run/vis/clip_0/1_mask.png"))
  assert mask[3, 3].any() and not mask[0, 0].any()
  assert not os.path.exists("gs:")                   # nothing local by mistake


def test_missing_checkpoint_url_is_named(bucket):
  with pytest.raises(checkpoint.CheckpointError,
                     match="^gs://b/none: no such checkpoint directory"):
    checkpoint.load_variables("gs://b/none")


def test_pth_files_read_from_a_bucket(bucket):
  """Pretrained weights and released checkpoints in the pod's bucket."""
  import sys  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.dirname(__file__))
  from pth_writer import write_pth  # pylint: disable=g-import-not-at-top
  from avsegformer_jax import torch_io  # pylint: disable=g-import-not-at-top
  (bucket / "b").mkdir(parents=True)
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  write_pth(bucket / "b" / "w.pth", {"fc.weight": w}, prefix="module.")
  sd = torch_io.load_state_dict("gs://b/w.pth")
  assert list(sd) == ["fc.weight"]
  np.testing.assert_array_equal(sd["fc.weight"], w)
  # torch's own files (zip and legacy), as tests/test_torch_io.py reads them
  fix = os.path.join(os.path.dirname(__file__), "fixtures", "torch")
  for name in ("zip_module", "legacy_module"):
    shutil.copy(os.path.join(fix, name + ".pth"), bucket / "b")
    sd = torch_io.load_state_dict(f"gs://b/{name}.pth")
    ref = np.load(os.path.join(fix, name + ".npz"))
    assert sorted(sd) == sorted(ref.files)
    for k in ref.files:
      np.testing.assert_array_equal(sd[k], ref[k], err_msg=k)
  with pytest.raises(torch_io.TorchFileError,
                     match=r"^gs://b/none\.pth: cannot open"):
    torch_io.load_state_dict("gs://b/none.pth")


def test_compile_cache_takes_a_url(monkeypatch, tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv(compile_cache.ENV, raising=False)
  monkeypatch.chdir(tmp_path)
  before = jax.config.jax_compilation_cache_dir
  try:
    assert compile_cache.enable("gs://b/xla") == "gs://b/xla"
    assert jax.config.jax_compilation_cache_dir == "gs://b/xla"
    assert not os.listdir(tmp_path)
  finally:
    jax.config.update("jax_compilation_cache_dir", before)


def test_disk_full(tmp_path, monkeypatch):
  """main.py's one-line report when a write fails on a (nearly) full disk;
  on a 3 MB tmpfs the demo died in libsndfile with "System error."."""
  usage = shutil.disk_usage(tmp_path)
  asked = []

  def fake(path, free):
    asked.append(path)
    return usage._replace(free=free)

  monkeypatch.setattr(shutil, "disk_usage", lambda p: fake(p, 5 << 20))
  # A workdir not made yet: the disk of its nearest existing folder.
  assert files.disk_full(tmp_path / "w" / "x") == "5.0 MiB free"
  assert asked[-1] == str(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda p: fake(p, 10 << 30))
  assert files.disk_full(tmp_path) is None
  assert files.disk_full("gs://bucket/run") is None     # not a local disk


def test_one_run_at_a_time_in_a_workdir(tmp_path):
  """A second run in a workdir is refused, naming the first; the lock goes
  with its process however that ends (here SIGKILL), and is not taken on a
  bucket (no locks there)."""
  import signal, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  from avsegformer_jax import errors  # pylint: disable=g-import-not-at-top
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time\n"
       "from avsegformer_jax import files\n"
       f"with files.exclusive({str(tmp_path)!r}):\n"
       "  print('held', flush=True); time.sleep(600)"],
      stdout=subprocess.PIPE, text=True,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(errors.InputError,
                       match=rf"{tmp_path}: another run trains there \(pid "
                       rf"{holder.pid} on .* since .*\); stop it, or give "
                       "another --workdir"):
      with files.exclusive(tmp_path):
        pass
    # The trainer takes it before any work.
    from configs import tiny  # pylint: disable=g-import-not-at-top
    with pytest.raises(errors.InputError, match="another run trains there"):
      trainer.train_and_evaluate(tiny.get_config(), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [files.LOCK_FILE]
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  import fcntl  # pylint: disable=g-import-not-at-top

  def held():                    # by another open file: flock's conflict
    with open(tmp_path / files.LOCK_FILE) as f:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
      except BlockingIOError:
        return True

  with files.exclusive(tmp_path):
    with files.exclusive(tmp_path):   # the demo's data, then its training
      assert held()
    assert held()                     # the inner end does not let it go
    assert f"pid {os.getpid()} on " in (tmp_path / files.LOCK_FILE).read_text()
  assert not held()
  with files.exclusive("gs://bucket/run"):    # no file, no error
    pass
