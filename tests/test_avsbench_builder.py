"""AVSBench TFDS builder: synthesize -> build -> tfds.data_source, per task, and bad input.

Labels are checked against what `synthesize` rendered (not against the mask
files the builder read), so a wrong frame order, palette or binarisation shows.
"""
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

tfds = pytest.importorskip("tensorflow_datasets")

from avsegformer_jax import audio  # noqa: E402
from datasets.avsbench import avsbench_dataset_builder as avsb  # noqa: E402
from datasets.avsbench import prepare, raw, synthesize  # noqa: E402
from tensorflow_datasets.scripts.cli import build as tfds_build_cli  # noqa: E402

TASKS = ("s4", "ms3", "avss")
SPLIT_NAMES = {"train": "train", "validation": "val", "test": "test"}


def build(manual_dir, data_dir, task, **kwargs):
  builder = avsb.Builder(config=task, data_dir=str(data_dir), num_workers=1, **kwargs)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """Each task synthesized (8 clips, 32 px) and built once; -> {task: (truth, data_dir)}."""
  raw_dir, data_dir = tmp_path_factory.mktemp("raw"), tmp_path_factory.mktemp("tfds")
  out = {}
  for task in TASKS:
    res = synthesize.synthesize(task, raw_dir, num_videos=8, seed=3, size=32)
    build(raw_dir, data_dir, task)
    out[task] = (json.loads(res.truth_path.read_text())["clips"], data_dir, res)
  return out


def read_split(data_dir, task, split):
  ds = tfds.data_source(f"avsbench/{task}", data_dir=str(data_dir), split=split)
  return [ds[i] for i in range(len(ds))]


def text(x):
  return x.decode() if isinstance(x, bytes) else str(x)


def test_builder_is_found_by_tfds_folder_convention():
  path = tfds_build_cli._search_script_path("datasets/avsbench")
  assert Path(path).resolve() == Path(avsb.__file__).resolve()
  assert avsb.Builder.name == "avsbench"
  assert [c.name for c in avsb.Builder.BUILDER_CONFIGS] == list(TASKS)


def test_a_builder_before_its_data_leaves_no_temp_folder(tmp_path, monkeypatch):
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  monkeypatch.setattr("tempfile.tempdir", str(tmp))
  builder = avsb.Builder(config="s4", data_dir=str(tmp_path / "data"))
  assert not builder.is_prepared()
  assert list(tmp.iterdir()) == []


@pytest.mark.parametrize("task", TASKS)
def test_features_flags_and_labels_match_the_synthesized_truth(built, task):
  truth, data_dir, _ = built[task]
  t_len = raw.TASKS[task].num_frames
  seen = set()
  for split, orig in SPLIT_NAMES.items():
    examples = read_split(data_dir, task, split)
    assert len(examples) == sum(c["split"] == orig for c in truth.values())
    for ex in examples:
      cid = text(ex["clip_id"])
      clip = truth[cid]
      seen.add(cid)
      assert clip["split"] == orig
      n = clip["frames"]
      frames, masks = np.stack(ex["frames"]), np.stack(ex["masks"])
      assert frames.shape == (n, clip["height"], clip["width"], 3) and frames.dtype == np.uint8
      assert masks.shape == (n, clip["height"], clip["width"], 1) and masks.dtype == np.uint8
      assert ex["log_mel"].shape == (t_len, 96, 64) and ex["log_mel"].dtype == np.float32
      vid, gt = ex["vid_flag"], ex["gt_flag"]
      assert vid.shape == gt.shape == (t_len,)
      if task == "avss":
        assert text(ex["category"]) == clip["subset"]
        n_sup = {"v1s": 1, "v1m": 5, "v2": 10}[clip["subset"]]
        np.testing.assert_array_equal(vid, [1] * n + [0] * (10 - n))
        np.testing.assert_array_equal(gt, [1] * n_sup + [0] * (10 - n_sup))
        n_gt = n_sup if orig == "train" else n
      else:
        want_cat = synthesize.CLASSES[clip["sounding"][0]][4] if task == "s4" else ""
        assert text(ex["category"]) == want_cat
        np.testing.assert_array_equal(vid, np.ones(5))
        n_gt = 1 if (task == "s4" and orig == "train") else 5
        np.testing.assert_array_equal(gt, [1] * n_gt + [0] * (5 - n_gt))
      for t in range(n):
        label = synthesize.sounding_mask(clip, t)         # 0 or 1 + synthetic class
        if t >= n_gt:
          assert not masks[t].any()
        elif task == "avss":
          lut = np.array([0] + [synthesize.avss_index(c) for c in range(len(synthesize.CLASSES))])
          np.testing.assert_array_equal(masks[t, ..., 0], lut[label])
        else:
          np.testing.assert_array_equal(masks[t, ..., 0], (label > 0).astype(np.uint8))
  assert seen == set(truth)


@pytest.mark.parametrize("task", TASKS)
def test_frames_and_log_mel_are_the_files_content(built, task):
  truth, data_dir, res = built[task]
  ex = read_split(data_dir, task, "validation")[0]
  clip, = [c for c in raw.read_clips(res.task_dir, task, "val") if c.clip_id == text(ex["clip_id"])]
  files = raw.clip_files(res.task_dir, clip)
  for got, path in zip(ex["frames"], files.frames):
    want = np.asarray(Image.open(path).convert("RGB"))
    tol = 2 if path.suffix == ".jpg" else 0               # JPEG decoders may differ by 1
    assert np.abs(got.astype(int) - want).max() <= tol
  spec = raw.TASKS[task]
  want = audio.fit_examples(audio.wav_file_to_examples(files.wav), spec.num_frames, spec.pad_mode)
  np.testing.assert_array_equal(ex["log_mel"], want)


def test_metadata_lists_silent_clips_and_avss_classes(built):
  for task in TASKS:
    truth, data_dir, _ = built[task]
    info = tfds.builder(f"avsbench/{task}", data_dir=str(data_dir)).info
    silent = info.metadata["silent_clips"]
    want = {s: sorted(c for c, v in truth.items() if v["split"] == o and not v["sounding"])
            for s, o in SPLIT_NAMES.items()}
    assert {s: sorted(v) for s, v in silent.items()} == want
    assert info.metadata["skipped_clips"] == []
  names = tfds.builder("avsbench/avss", data_dir=str(built["avss"][1])).info.metadata["class_names"]
  assert len(names) == 71 and names[0] == "background"


# ---- bad input: each stops the build naming the file, or is skipped when allowed ----

@pytest.fixture(scope="module")
def small_raw(tmp_path_factory):
  """Clips train 2 / val 1 / test 1 per task (24 px), copied and damaged by each test."""
  root = tmp_path_factory.mktemp("small")
  for task in TASKS:
    synthesize.synthesize(task, root, num_videos=4, seed=5, size=24)
  return root


@pytest.fixture
def damaged(small_raw, tmp_path):
  """-> (manual_dir, data_dir, train clip files of `task`) on a private copy."""
  def make(task):
    manual = tmp_path / "raw"
    shutil.copytree(small_raw, manual)
    root = raw.find_task_root(manual, task)
    clip = raw.read_clips(root, task, "train")[0]
    return manual, tmp_path / "out", root, clip, raw.clip_files(root, clip)
  return make


def expect_error(manual, out, task, *fragments):
  with pytest.raises(raw.AVSBenchError) as err:
    build(manual, out, task)
  for fragment in fragments:
    assert str(fragment) in str(err.value), str(err.value)
  return str(err.value)


def test_missing_frame(damaged):
  manual, out, _, _, files = damaged("s4")
  files.frames[2].unlink()
  expect_error(manual, out, "s4", files.frames[2], "missing frame")


def test_corrupt_frame(damaged):
  manual, out, _, _, files = damaged("ms3")
  files.frames[1].write_bytes(files.frames[1].read_bytes()[:60])   # truncated PNG
  expect_error(manual, out, "ms3", files.frames[1], "corrupt frame")


def test_mask_size_differs_from_frame(damaged):
  manual, out, _, _, files = damaged("ms3")
  Image.open(files.masks[3]).resize((20, 24)).save(files.masks[3])
  expect_error(manual, out, "ms3", files.masks[3], "20x24", "24x24")


@pytest.mark.parametrize("case,problem", [
    ("missing", "does not exist"), ("empty", "empty"), ("truncated", "truncated"),
    ("too_short", "needs at least 0.975 s")])
def test_bad_wav(damaged, case, problem):
  manual, out, _, _, files = damaged("s4")
  if case == "missing":
    files.wav.unlink()
  elif case == "empty":
    files.wav.write_bytes(b"")
  elif case == "truncated":
    files.wav.write_bytes(files.wav.read_bytes()[:5000])
  else:
    sf.write(str(files.wav), np.full(8000, 0.1), 16000, subtype="PCM_16")
  expect_error(manual, out, "s4", files.wav, problem)


def test_silent_wav_is_kept_and_listed(damaged):
  manual, out, _, clip, files = damaged("s4")
  sf.write(str(files.wav), np.zeros(80000), 16000, subtype="PCM_16")
  builder = build(manual, out, "s4")
  ex, = [e for e in read_split(out, "s4", "train") if text(e["clip_id"]) == clip.clip_id]
  np.testing.assert_allclose(ex["log_mel"], np.log(0.01), rtol=1e-6)
  assert builder.info.metadata["silent_clips"]["train"] == [clip.clip_id]


def test_csv_row_naming_a_missing_clip(damaged):
  manual, out, root, _, _ = damaged("ms3")
  csv_path = root / "ms3_meta_data.csv"
  csv_path.write_text(csv_path.read_text() + "NoSuchVideo,train\n")
  msg = expect_error(manual, out, "ms3", csv_path, "NoSuchVideo", "does not exist")
  assert ":6:" in msg                                      # header + 4 rows, then ours


def test_unknown_colour_in_avss_label_map(damaged):
  manual, out, _, _, files = damaged("avss")
  rgb = np.asarray(Image.open(files.masks[0]).convert("RGB")).copy()
  rgb[0, 0] = (1, 2, 3)
  Image.fromarray(rgb).save(files.masks[0])
  expect_error(manual, out, "avss", files.masks[0], "(1,2,3) x1", "not in the 71-class")


def test_avss_label_maps_missing_for_supervised_frames(damaged):
  manual, out, root, _, _ = damaged("avss")
  clip = raw.read_clips(root, "avss", "val")[0]           # val/test need one per frame
  label_dir = root / clip.category / clip.clip_id / "labels_rgb"
  max(label_dir.glob("*.png")).unlink()
  expect_error(manual, out, "avss", label_dir, "label maps")


def test_label2idx_must_have_71_entries(damaged):
  manual, out, root, _, _ = damaged("avss")
  (root / "label2idx.json").write_text(json.dumps({"background": 0, "dog": 1}))
  expect_error(manual, out, "avss", root / "label2idx.json", "71")


def test_skip_bad_clips_skips_counts_and_lists(damaged, monkeypatch):
  manual, out, root, clip, files = damaged("s4")
  frame0 = files.frames[0].read_bytes()
  files.frames[0].unlink()
  other = raw.read_clips(root, "s4", "train")[1]
  other_wav = raw.clip_files(root, other).wav
  other_wav.write_bytes(b"")
  assert not avsb.Builder(config="s4", data_dir=str(out))._skip_bad_clips
  monkeypatch.setenv(avsb.SKIP_ENV, "1")
  with pytest.raises(raw.AVSBenchError, match="all 2 clip.*split train are bad"):
    build(manual, out, "s4")                                  # never an empty split
  files.frames[0].write_bytes(frame0)
  builder = build(manual, out, "s4")
  assert builder.info.splits["train"].num_examples == 1
  assert builder.info.splits["validation"].num_examples == 1
  skipped = builder.info.metadata["skipped_clips"]
  assert [(s["split"], s["clip_id"]) for s in skipped] == [("train", other.clip_id)]
  assert str(other_wav) in skipped[0]["reason"] and "empty" in skipped[0]["reason"]
  listing = (builder.data_path / avsb.SKIPPED_FILE).read_text()
  assert "1 clip(s) skipped" in listing and str(other_wav) in listing


def test_mask_file_modes_decode_alike(damaged, tmp_path):
  """RGB, palette and 1-bit S4/MS3 masks and palette-mode AVSS maps give the same labels."""
  manual, out, root, clip, files = damaged("ms3")
  grey = [np.asarray(Image.open(p)) for p in files.masks[:3]]
  Image.fromarray(np.stack([grey[0]] * 3, -1)).save(files.masks[0])          # RGB
  pal = Image.fromarray((grey[1] > 0).astype(np.uint8), "P")
  pal.putpalette([0, 0, 0, 255, 255, 255])
  pal.save(files.masks[1])                                                   # P, index 1 white
  Image.fromarray(grey[2] > 0).save(files.masks[2])                          # mode "1"
  build(manual, out, "ms3")
  truth = json.loads((root / "synth_truth.json").read_text())["clips"][clip.clip_id]
  ex, = [e for e in read_split(out, "ms3", "train") if text(e["clip_id"]) == clip.clip_id]
  for t in range(3):
    np.testing.assert_array_equal(ex["masks"][t][..., 0], synthesize.sounding_mask(truth, t) > 0)

  root = raw.find_task_root(manual, "avss")
  clip = raw.read_clips(root, "avss", "train")[0]
  path = raw.clip_files(root, clip).masks[0]
  palette = raw.avss_palette()
  rgb = np.asarray(Image.open(path).convert("RGB"))
  index = raw.colours_to_classes(rgb, palette, path)
  p_img = Image.fromarray(index, "P")
  p_img.putpalette(palette.reshape(-1).tolist())
  p_img.save(path)
  build(manual, tmp_path / "out_avss", "avss")
  truth = json.loads((root / "synth_truth.json").read_text())["clips"][clip.clip_id]
  ex, = [e for e in read_split(tmp_path / "out_avss", "avss", "train")
         if text(e["clip_id"]) == clip.clip_id]
  lut = np.array([0] + [synthesize.avss_index(c) for c in range(len(synthesize.CLASSES))])
  np.testing.assert_array_equal(ex["masks"][0][..., 0], lut[synthesize.sounding_mask(truth, 0)])


_HIDE_TF = """
import sys
class Hide:                       # as if TensorFlow were not installed
  def __init__(self, finder): self.finder = finder
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] == "tensorflow": return None
    return self.finder.find_spec(name, path, target)
sys.meta_path[:] = [Hide(f) for f in sys.meta_path]
import tensorflow_datasets as tfds
from datasets.avsbench import prepare
path = prepare.prepare("ms3", sys.argv[1], sys.argv[2], num_workers=1)
ds = tfds.data_source("avsbench/ms3", data_dir=sys.argv[2], split="train")
assert len(ds) == 2 and ds[0]["masks"][0].shape == (24, 24, 1)
assert not any(m.split(".")[0] == "tensorflow" for m in sys.modules)
print("OK", path)
"""


def test_build_and_read_need_no_tensorflow(small_raw, tmp_path):
  import subprocess
  import sys
  out = subprocess.run([sys.executable, "-c", _HIDE_TF, str(small_raw), str(tmp_path)],
                       capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=120)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


def test_a_first_prepare_logs_no_fault(small_raw, tmp_path, caplog):
  """TFDS warns "Variant folder ... has no dataset_info.json" for a dataset
  not built yet: the first line of a user's first run, read as a fault."""
  with caplog.at_level(logging.WARNING):
    prepare.prepare("s4", small_raw, tmp_path, num_workers=1)
  assert "has no dataset_info.json" not in caplog.text
  assert prepare.is_prepared("s4", tmp_path)


def test_prepare_into_a_log_writes_lines_not_bars(small_raw, tmp_path,
                                                  monkeypatch, capsys):
  """AVSS takes about an hour to prepare: into a batch job's log TFDS's bars
  wrote a carriage-return update several times a second; now a plain line
  every progress.EVERY_S (0 here: every clip)."""
  from avsegformer_jax import progress
  monkeypatch.setattr(progress, "EVERY_S", 0)
  try:
    prepare.main(["--config=s4", f"--manual_dir={small_raw}",
                  f"--data_dir={tmp_path}", "--num_workers=1"])
  finally:
    tfds.display_progress_bar(True)
  out, err = capsys.readouterr()
  assert "\r" not in out + err
  assert [ln for ln in out.splitlines() if ln.startswith("avsbench/")] == [
      "avsbench/s4 train: 1/2 clips read in 0 min, about 0 min to go",
      "avsbench/s4 train: 2/2 clips read in 0 min, about 0 min to go",
      "avsbench/s4 validation: 1/1 clips read in 0 min, about 0 min to go",
      "avsbench/s4 test: 1/1 clips read in 0 min, about 0 min to go"]
  assert out.splitlines()[-1].startswith(f"prepared {tmp_path}/avsbench/s4/")
