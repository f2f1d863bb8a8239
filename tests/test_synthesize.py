"""Synthetic AVSBench: deterministic, in the real layout, and only solvable with audio."""
import hashlib
import json

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from avsegformer_jax import audio
from datasets.avsbench import raw, synthesize


def digest(folder):
  return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def clips_of(res, task):
  truth = json.loads(res.truth_path.read_text())["clips"]
  for split in ("train", "val", "test"):
    for clip in raw.read_clips(res.task_dir, task, split):
      yield clip, raw.clip_files(res.task_dir, clip), truth[clip.clip_id]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
  root = tmp_path_factory.mktemp("synth")
  return {task: synthesize.synthesize(task, root, num_videos=30, seed=0, size=24)
          for task in ("s4", "ms3", "avss")}


def test_deterministic_given_the_seed(tmp_path):
  a = synthesize.synthesize("ms3", tmp_path / "a", num_videos=4, seed=7, size=24)
  b = synthesize.synthesize("ms3", tmp_path / "b", num_videos=4, seed=7, size=24)
  c = synthesize.synthesize("ms3", tmp_path / "c", num_videos=4, seed=8, size=24)
  assert digest(a.task_dir) == digest(b.task_dir)
  assert digest(a.task_dir) != digest(c.task_dir)
  assert a.num_clips == {"train": 2, "val": 1, "test": 1}


def test_rerun_reuses_and_guards_existing_sets(tmp_path):
  a = synthesize.synthesize("s4", tmp_path, num_videos=3, seed=0, size=24)
  stamp = a.csv_path.stat().st_mtime_ns
  assert synthesize.synthesize("s4", tmp_path, num_videos=3, seed=0, size=24) == a
  assert a.csv_path.stat().st_mtime_ns == stamp
  with pytest.raises(FileExistsError, match="overwrite"):
    synthesize.synthesize("s4", tmp_path, num_videos=3, seed=1, size=24)
  synthesize.synthesize("s4", tmp_path, num_videos=3, seed=1, size=24, overwrite=True)
  with pytest.raises(ValueError, match="at least 3"):
    synthesize.synthesize("s4", tmp_path / "x", num_videos=2)


@pytest.mark.parametrize("task", ["s4", "ms3"])
def test_each_class_has_its_own_sound(sets, task):
  """In every 0.96 s example the sounding classes' bands beat every other class's
  band by > 2 nats of log-mel: the sources can be read off the audio."""
  w, hz = audio.mel_matrix(), np.linspace(0, 8000, 257)
  band = [int(np.argmax(w[np.argmin(np.abs(hz - c[2]))])) for c in synthesize.CLASSES]
  assert len(set(band)) == len(band) and min(np.diff(sorted(band))) >= 5
  for _, files, clip in clips_of(sets[task], task):
    ex = audio.wav_file_to_examples(files.wav).mean(axis=1)      # [n, 64]
    if not clip["sounding"]:
      np.testing.assert_allclose(ex, np.log(0.01), rtol=1e-6)
      continue
    quiet = [k for k in range(len(band)) if k not in clip["sounding"]]
    loud = min(ex[:, band[k]].min() for k in clip["sounding"])
    assert loud > max(ex[:, band[k]].max() for k in quiet) + 2.0


@pytest.mark.parametrize("task", ["s4", "ms3", "avss"])
def test_only_audio_tells_which_object_is_in_the_mask(sets, task):
  sounding_counts, shown_silent = set(), set()
  for _, files, clip in clips_of(sets[task], task):
    shown = [o["cls"] for o in clip["objects"]]
    assert len(shown) >= 2 and len(set(shown)) == len(shown)
    assert set(clip["sounding"]) < set(shown)                  # strict: something is quiet
    sounding_counts.add(len(clip["sounding"]))
    shown_silent.update(c for c in shown if c not in clip["sounding"])
    h, w = clip["height"], clip["width"]
    for obj in clip["objects"]:                                # big enough, and moving
      first, last = (synthesize.object_mask(obj, t, h, w) for t in (0, clip["frames"] - 1))
      assert 0.025 < first.sum() / min(h, w) ** 2 < 0.12      # ~(0.25-0.35 side)^2 x fill
      assert np.argwhere(first).mean(0).tolist() != np.argwhere(last).mean(0).tolist()
    m = synthesize.sounding_mask(clip, 0)
    frame = np.asarray(Image.open(files.frames[0]).convert("RGB")).astype(int)
    for obj in clip["objects"]:                                # drawn in its class colour
      inside = synthesize.object_mask(obj, 0, h, w)
      colour = np.asarray(synthesize.CLASSES[obj["cls"]][1]) * clip["brightness"]
      assert np.abs(np.median(frame[inside], axis=0) - colour).max() < 20
      assert (m[inside] > 0).all() == (obj["cls"] in clip["sounding"])
  assert shown_silent == set(range(len(synthesize.CLASSES)))   # every class is also a distractor
  if task == "ms3":
    assert {0, 1, 2} <= sounding_counts                        # silent, one and two sources


@pytest.mark.parametrize("task", ["s4", "ms3", "avss"])
def test_wav_variety_as_in_the_real_data(sets, task):
  formats, short = set(), 0
  for _, files, clip in clips_of(sets[task], task):
    info = sf.info(str(files.wav))
    formats.add((info.samplerate, info.channels, info.subtype))
    full = 10.0 if clip.get("subset") == "v2" else 5.0
    assert info.duration == pytest.approx(clip["duration"], abs=1e-3)
    short += info.duration < full
  assert formats == {(16000, 1, "PCM_16"), (44100, 2, "PCM_16")}
  assert short >= 1


def test_avss_layout_palette_and_subsets(sets):
  res = sets["avss"]
  names = json.loads((res.task_dir / "label2idx.json").read_text())
  assert len(names) == 71 and names["background"] == 0
  assert raw.read_label2idx(res.task_dir / "label2idx.json") == list(names)
  palette, subsets = raw.avss_palette(), set()
  for clip, files, truth in clips_of(res, "avss"):
    subsets.add(clip.category)
    n = {"v1s": 5, "v1m": 5, "v2": 10}[clip.category]
    labels = sorted((files.clip_dir / "labels_rgb").glob("*.png"))
    want = 1 if clip.category == "v1s" and clip.split == "train" else n
    assert len(list((files.clip_dir / "frames").glob("*.jpg"))) == n and len(labels) == want
    rgb = np.asarray(Image.open(labels[0]).convert("RGB"))
    assert rgb.shape == (24, 32, 3)                            # AVSS frames are not square
    lut = np.array([0] + [synthesize.avss_index(c) for c in range(len(synthesize.CLASSES))])
    np.testing.assert_array_equal(rgb, palette[lut[synthesize.sounding_mask(truth, 0)]])
  assert subsets == {"v1s", "v1m", "v2"}
  assert synthesize.avss_index(0) == names["dog"]


def test_cli(tmp_path, capsys):
  synthesize.main(["--task", "s4", "--out", str(tmp_path), "--videos", "3", "--size", "24"])
  assert "wrote 3 s4 clips" in capsys.readouterr().out
  assert (tmp_path / "Single-source" / "s4_meta_data.csv").read_text().startswith(
      "name,start,category,split")
