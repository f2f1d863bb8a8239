"""A small synthetic AVSBench, in the real on-disk layout, learnable only with audio.

  python -m datasets.avsbench.synthesize --task {s4,ms3,avss} --out DIR [--videos N] [--seed S] [--size PX]

writes DIR/Single-source (s4), DIR/Multi-sources (ms3) or DIR/AVSS (avss) exactly
as `raw.py` (and the original loaders) read them, so DIR is a TFDS manual dir.

Each clip shows 2-3 objects of distinct classes (shape + saturated colour) on a
textured grey background, one per quadrant, moving within it from frame to
frame. Which of them sound is drawn at random per clip, so the same picture
comes with different masks depending on the audio alone. Each class has its
own sound: a tone at a class frequency (300 Hz ... 4.6 kHz, >= 5 mel bands
apart) amplitude-modulated at a class rate. Masks hold only the sounding
object(s). MS3 clips have 1-2 sources; AVSS has v1s (1 source, 5 frames),
v1m (1-2, 5 frames) and v2 (1-2, 10 frames) clips with palette-coloured label
maps. 10% of MS3 / AVSS clips are silent (all-zero wav, empty mask; S4 has no
silent clip since its category names the source), ~14% of wavs are shorter
than the clip (1.5-4 s), 10% are 44.1 kHz stereo (the rest 16 kHz mono).
`synth_truth.json` in the task folder records every clip's objects and sources
(the builder ignores it). Deterministic given the arguments. The AVSS class
names in label2idx.json are stand-ins; only their count (71) and order matter.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import soundfile as sf
from PIL import Image

from avsegformer_jax import errors, files

from . import raw

# shape, RGB colour, tone (Hz), AM rate (Hz), S4 category, AVSS label
CLASSES = (
    ("circle", (230, 40, 40), 300.0, 2.0, "dog_barking", "dog"),
    ("square", (40, 200, 60), 520.0, 3.0, "playing_piano", "piano"),
    ("triangle", (50, 90, 235), 900.0, 5.0, "helicopter", "helicopter"),
    ("diamond", (245, 220, 40), 1550.0, 7.0, "cat_meowing", "cat"),
    ("cross", (225, 50, 225), 2700.0, 11.0, "ambulance_siren", "emergency-car"),
    ("ring", (40, 215, 225), 4600.0, 13.0, "playing_violin", "violin"),
)
AVSS_LABELS = (  # 70 stand-in names + background = 71, as the original asserts
    "accordion airplane axe baby bassoon bell bird boat boy bus car cat cello clarinet clipper "
    "clock dog donkey drum duck elephant emergency-car erhu flute frying-food girl goose guitar "
    "gun guzheng hair-dryer handpan harmonica harp helicopter hen horse keyboard leopard lion man "
    "marimba missile-rocket motorcycle mower piano pig pipa saw saxophone sheep sitar sorna "
    "squirrel tabla tank tiger tractor train trombone truck trumpet tuba ukulele utv "
    "vacuum-cleaner violin wolf woman lawn-mower").split()
SPLIT_FRACTIONS = {"val": 0.15, "test": 0.15}
_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_TASK_INDEX = {"s4": 0, "ms3": 1, "avss": 2}


@dataclasses.dataclass(frozen=True)
class SynthResult:
  manual_dir: Path        # pass to TFDS as manual_dir
  task_dir: Path
  csv_path: Path
  truth_path: Path
  num_clips: dict         # original split name -> clips


def label2idx() -> dict:
  names = ["background"] + list(AVSS_LABELS)
  assert len(names) == raw.AVSS_NUM_CLASSES
  return {n: i for i, n in enumerate(names)}


def avss_index(cls: int) -> int:
  return label2idx()[CLASSES[cls][5]]


def object_mask(obj: dict, t: int, height: int, width: int) -> np.ndarray:
  """[H,W] bool raster of one object in frame t (shared by frames and masks)."""
  f = t / max(obj["frames"] - 1, 1)
  cx = obj["start"][0] + f * (obj["end"][0] - obj["start"][0])
  cy = obj["start"][1] + f * (obj["end"][1] - obj["start"][1])
  yy, xx = np.mgrid[0:height, 0:width] + 0.5
  dx, dy, r = xx - cx, yy - cy, obj["size"] / 2
  shape = CLASSES[obj["cls"]][0]
  if shape == "circle":
    return dx * dx + dy * dy <= r * r
  if shape == "square":
    return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
  if shape == "triangle":
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
  if shape == "diamond":
    return np.abs(dx) + np.abs(dy) <= r
  if shape == "cross":
    return (((np.abs(dx) <= r / 2) & (np.abs(dy) <= r))
            | ((np.abs(dy) <= r / 2) & (np.abs(dx) <= r)))
  d2 = dx * dx + dy * dy
  return (d2 <= r * r) & (d2 >= (0.45 * r) ** 2)          # ring


def sounding_mask(clip: dict, t: int) -> np.ndarray:
  """[H,W] int: 0 background, else 1 + class of the sounding object there."""
  out = np.zeros((clip["height"], clip["width"]), np.int32)
  for obj in clip["objects"]:
    if obj["cls"] in clip["sounding"]:
      out[object_mask(obj, t, clip["height"], clip["width"])] = obj["cls"] + 1
  return out


def _clip_id(rng, taken: set, suffix: bool) -> str:
  while True:
    cid = "".join(rng.choice(list(_ID_CHARS), 11))
    if suffix:
      cid += f"_{int(rng.integers(0, 30))}"
    if cid not in taken:
      taken.add(cid)
      return cid


def _objects(rng, n_objects, n_frames, height, width) -> list[dict]:
  """Distinct classes, one per quadrant, each moving inside its quadrant."""
  classes = rng.choice(len(CLASSES), n_objects, replace=False)
  cells = rng.choice(4, n_objects, replace=False)
  objs = []
  for cls, cell in zip(classes, cells):
    size = float(rng.uniform(0.25, 0.35) * min(height, width))
    x0, y0 = (cell % 2) * width / 2, (cell // 2) * height / 2
    lo_x, hi_x = x0 + size / 2 + 1, x0 + width / 2 - size / 2 - 1
    lo_y, hi_y = y0 + size / 2 + 1, y0 + height / 2 - size / 2 - 1
    # From near one end of its range to near the other, on each axis: it visibly moves.
    ends = []
    for lo, hi in ((lo_x, hi_x), (lo_y, hi_y)):
      a, b = rng.uniform(lo, lo + 0.2 * (hi - lo)), rng.uniform(hi - 0.2 * (hi - lo), hi)
      ends.append((a, b) if rng.random() < 0.5 else (b, a))
    objs.append({"cls": int(cls), "size": size, "start": [float(e[0]) for e in ends],
                 "end": [float(e[1]) for e in ends], "frames": n_frames})
  return objs


def _render(rng, clip: dict, t: int, texture: np.ndarray) -> np.ndarray:
  img = texture + rng.normal(0, 5, texture.shape[:2] + (1,))
  for obj in clip["objects"]:
    m = object_mask(obj, t, clip["height"], clip["width"])
    img[m] = np.asarray(CLASSES[obj["cls"]][1], np.float64) * clip["brightness"]
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _texture(rng, height, width) -> np.ndarray:
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
  base = rng.uniform(80, 160) + rng.uniform(-12, 12, 3)
  fx, fy = rng.uniform(0.05, 0.25, 2) * rng.choice([-1, 1], 2)
  stripes = 14 * np.sin(2 * np.pi * (fx * xx + fy * yy) / 2 + rng.uniform(0, 6.3))
  blotch = rng.normal(0, 10, (height // 8 + 1, width // 8 + 1))
  blotch = np.kron(blotch, np.ones((8, 8)))[:height, :width]
  return base + (stripes + blotch)[..., None]


def _audio(rng, clip: dict) -> np.ndarray:
  """[n] mono or [n,2] stereo float in [-1,1]: the sounding classes' tones."""
  sr = clip["sample_rate"]
  t = np.arange(int(round(clip["duration"] * sr))) / sr
  y = np.zeros_like(t)
  if clip["sounding"]:
    amp = 0.5 / len(clip["sounding"]) ** 0.5
    for cls in clip["sounding"]:
      _, _, freq, am_rate, _, _ = CLASSES[cls]
      f = freq * rng.uniform(0.97, 1.03)
      env = 0.6 + 0.4 * np.sin(2 * np.pi * am_rate * t + rng.uniform(0, 6.3))
      y += amp * env * np.sin(2 * np.pi * f * t + rng.uniform(0, 6.3))
    y += rng.normal(0, 0.003, y.shape)
  if clip["channels"] == 2:
    y = np.stack([y, 0.8 * y], axis=1)
  return np.clip(y, -1, 1)


def _plan(task: str, rng, i: int, split: str, subset: str, height: int, width: int) -> dict:
  """Clip i's content. Silent (MS3 / AVSS: i % 10 == 6), short (i % 7 == 3) and
  44.1 kHz stereo (i % 10 == 1) clips follow the index, so tiny sets have them."""
  n_frames = raw.AVSS_SUBSETS[subset][0] if task == "avss" else 5
  n_objects = int(rng.integers(2, 4)) if task in ("s4", "avss") else 3
  objects = _objects(rng, n_objects, n_frames, height, width)
  shown = [o["cls"] for o in objects]
  single = task == "s4" or subset == "v1s"
  if not single and i % 10 == 6:
    sounding = []
  else:
    k = 1 if single else min(int(rng.choice([1, 2], p=[0.35, 0.65])), len(shown) - 1)
    sounding = sorted(int(c) for c in rng.choice(shown, k, replace=False))
  full = 10.0 if subset == "v2" else 5.0
  short, stereo = i % 7 == 3, i % 10 == 1
  return {"split": split, "subset": subset, "height": height, "width": width,
          "frames": n_frames, "objects": objects, "sounding": sounding,
          "duration": float(rng.uniform(1.5, 4.0)) if short else full,
          "sample_rate": 44100 if stereo else 16000, "channels": 2 if stereo else 1,
          "brightness": float(rng.uniform(0.9, 1.05))}


def _write_clip(task: str, task_dir: Path, cid: str, clip: dict, rng) -> None:
  split, h, w = clip["split"], clip["height"], clip["width"]
  if task == "s4":
    cat = CLASSES[clip["sounding"][0]][4]
    frame_dir = task_dir / "s4_data" / "visual_frames" / split / cat / cid
    mask_dir = task_dir / "s4_data" / "gt_masks" / split / cat / cid
    wav = task_dir / "s4_data" / "audio_wav" / split / cat / f"{cid}.wav"
  elif task == "ms3":
    frame_dir = task_dir / "ms3_data" / "visual_frames" / cid
    mask_dir = task_dir / "ms3_data" / "gt_masks" / split / cid
    wav = task_dir / "ms3_data" / "audio_wav" / split / f"{cid}.wav"
  else:
    frame_dir = task_dir / clip["subset"] / cid / "frames"
    mask_dir = task_dir / clip["subset"] / cid / "labels_rgb"
    wav = task_dir / clip["subset"] / cid / "audio.wav"
  for d in (frame_dir, mask_dir, wav.parent):
    d.mkdir(parents=True, exist_ok=True)
  texture = _texture(rng, h, w)
  if task == "avss":
    n_masks = raw.AVSS_SUBSETS[clip["subset"]][1] if split == "train" else clip["frames"]
    colours = np.zeros((len(CLASSES) + 1, 3), np.uint8)
    colours[1:] = raw.avss_palette()[[avss_index(c) for c in range(len(CLASSES))]]
  else:
    n_masks = 1 if task == "s4" and split == "train" else 5
  for t in range(clip["frames"]):
    img = Image.fromarray(_render(rng, clip, t, texture))
    if task == "avss":
      img.save(frame_dir / f"{t}.jpg", quality=92, subsampling=0)   # 4:4:4 keeps small shapes' colour
    elif task == "s4":
      img.save(frame_dir / f"{cid}_{t + 1}.png")
    else:
      img.save(frame_dir / f"{cid}.mp4_{t + 1}.png")
    if t >= n_masks:
      continue
    m = sounding_mask(clip, t)
    if task == "avss":
      Image.fromarray(colours[m]).save(mask_dir / f"{t}.png")
    else:
      Image.fromarray(np.where(m > 0, 255, 0).astype(np.uint8), "L").save(
          mask_dir / f"{cid}_{t + 1}.png")
  sf.write(str(wav), _audio(rng, clip), clip["sample_rate"], subtype="PCM_16")


def _split_names(n: int) -> list[str]:
  n_val = max(1, int(round(n * SPLIT_FRACTIONS["val"])))
  n_test = max(1, int(round(n * SPLIT_FRACTIONS["test"])))
  if n - n_val - n_test < 1:
    raise errors.InputError(f"need at least 3 videos (one per split), got {n}")
  return ["train"] * (n - n_val - n_test) + ["val"] * n_val + ["test"] * n_test


def synthesize(task: str, out_dir, num_videos: int = 60, seed: int = 0, size: int = 96,
               overwrite: bool = False) -> SynthResult:
  """Writes the synthetic `task` under out_dir (the TFDS manual dir) and returns its paths.

  Re-running with the same arguments returns the existing set untouched; other
  arguments on an existing set raise FileExistsError unless overwrite=True.
  """
  if task not in raw.TASKS:
    raise ValueError(f"task must be one of {sorted(raw.TASKS)}, got {task!r}")
  if size < 24:
    raise ValueError(f"size must be >= 24 px, got {size}")
  spec = raw.TASKS[task]
  out_dir = Path(out_dir)
  task_dir = out_dir / spec.folder
  truth_path = task_dir / "synth_truth.json"
  params = {"task": task, "num_videos": num_videos, "seed": seed, "size": size}
  splits = _split_names(num_videos)
  result = SynthResult(out_dir, task_dir, task_dir / spec.csv_name, truth_path,
                       {s: splits.count(s) for s in ("train", "val", "test")})
  if task_dir.exists():
    if truth_path.is_file() and json.loads(truth_path.read_text())["params"] == params:
      return result
    if not overwrite:
      raise FileExistsError(f"{task_dir} exists (with other contents); pass overwrite=True")
    shutil.rmtree(task_dir)
  task_dir.mkdir(parents=True)
  height, width = size, (size * 4 // 3 if task == "avss" else size)   # AVSS frames are not square
  plan_rng = np.random.default_rng([seed, _TASK_INDEX[task]])
  subsets = ["v1s"] * 4 + ["v1m"] * 3 + ["v2"] * 3
  taken, clips = set(), {}
  for i, split in enumerate(splits):
    subset = str(plan_rng.choice(subsets)) if task == "avss" else ""
    cid = _clip_id(plan_rng, taken, suffix=task != "ms3")
    clip_rng = np.random.default_rng([seed, _TASK_INDEX[task], i, 1])
    clips[cid] = _plan(task, clip_rng, i, split, subset, height, width)
    _write_clip(task, task_dir, cid, clips[cid], clip_rng)
  with open(result.csv_path, "w", newline="") as f:
    w = csv.writer(f)
    if task == "s4":
      w.writerow(["name", "start", "category", "split"])
      w.writerows([c, 0, CLASSES[v["sounding"][0]][4], v["split"]] for c, v in clips.items())
    elif task == "ms3":
      w.writerow(["video_id", "split"])
      w.writerows([c, v["split"]] for c, v in clips.items())
    else:
      w.writerow(["vid", "uid", "s_min", "s_sec", "a_obj", "split", "label"])
      w.writerows([c.rsplit("_", 1)[0], c, 0, 0,
                   ";".join(CLASSES[k][5] for k in v["sounding"]), v["split"], v["subset"]]
                  for c, v in clips.items())
  if task == "avss":
    (task_dir / "label2idx.json").write_text(json.dumps(label2idx(), indent=1))
  truth_path.write_text(json.dumps({"params": params, "classes": CLASSES, "clips": clips}))
  return result


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--task", required=True, choices=sorted(raw.TASKS))
  p.add_argument("--out", required=True, help="AVSBench root to write (the TFDS manual dir)")
  p.add_argument("--videos", type=int, default=60, help="clips in all splits (70/15/15)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--size", type=int, default=96, help="frame height in px (AVSS width = 4/3 of it)")
  p.add_argument("--overwrite", action="store_true")
  a = p.parse_args(argv)
  try:
    files.make_output_dir(a.out, "the output folder")
    r = synthesize(a.task, a.out, a.videos, a.seed, a.size, overwrite=a.overwrite)
  except errors.InputError as e:
    errors.exit_with("synthesize", e)
  except Exception as e:  # pylint: disable=broad-except
    errors.exit_if_disk_full("synthesize", a.out, e,
                             "synthesize again with --overwrite")
    raise
  print(f"wrote {sum(r.num_clips.values())} {a.task} clips {r.num_clips} to {r.task_dir}")


if __name__ == "__main__":
  main()
