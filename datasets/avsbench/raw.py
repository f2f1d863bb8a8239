"""Reads AVSBench exactly as distributed, one validated clip at a time.

No TensorFlow here: the TFDS builder and the tests both use this module. The
layouts are those the original code reads (AVSegFormer `config/*`,
`dataloader/*_dataset.py`; AVSBench `preprocess_scripts/*`):

  S4   Single-source/s4_meta_data.csv        columns name, start, category, split
       s4_data/visual_frames/{split}/{category}/{name}/{name}_{1..5}.png
       s4_data/gt_masks/{split}/{category}/{name}/{name}_{i}.png  (train: i = 1 only)
       s4_data/audio_wav/{split}/{category}/{name}.wav
  MS3  Multi-sources/ms3_meta_data.csv       columns name, split
       ms3_data/visual_frames/{name}/{name}.mp4_{1..5}.png        (no split level)
       ms3_data/gt_masks/{split}/{name}/{name}_{1..5}.png
       ms3_data/audio_wav/{split}/{name}.wav
  AVSS AVSS/metadata.csv (columns uid, label = v1s | v1m | v2, split), AVSS/label2idx.json
       AVSS/{label}/{uid}/frames/{0..n-1}.jpg, labels_rgb/{0..m-1}.png, audio.wav

Original split names are train / val / test. Masks: S4 and MS3 are binarised
the way the original's S4 loader does it, PIL `convert("1")` (threshold at
128 with PIL's dithering; for AVSBench's 0/255 masks a plain threshold; the
MS3 loader's mode "P" / 255 gives the same 0/1 on such masks). AVSS colour maps
are decoded against the original's 71-colour palette (class j has the
PASCAL-VOC bit-interleaved colour of j); a colour outside it is an error, not
background as in the original's argmax.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from avsegformer_jax import audio, errors, visualize


class AVSBenchError(errors.InputError):
  """A raw AVSBench file is missing or wrong; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  folder: str        # under the manual dir
  csv_name: str
  num_frames: int    # T
  pad_mode: str      # audio short-clip rule (audio.fit_examples)


TASKS = {
    "s4": Task("s4", "Single-source", "s4_meta_data.csv", 5, "repeat_last"),
    "ms3": Task("ms3", "Multi-sources", "ms3_meta_data.csv", 5, "repeat_last"),
    "avss": Task("avss", "AVSS", "metadata.csv", 10, "zero_pad"),
}
SPLITS = {"train": "train", "validation": "val", "test": "test"}  # TFDS -> original
AVSS_NUM_CLASSES = 71
# AVSS subset -> (real frames, frames with a supervised mask), from the original.
AVSS_SUBSETS = {"v1s": (5, 1), "v1m": (5, 5), "v2": (10, 10)}
SILENT_LOG_MEL = np.float32(np.log(0.01))   # log(mel + 0.01) of an all-zero wav


@dataclasses.dataclass(frozen=True)
class Clip:
  """One CSV row: where it came from, so errors can point at it."""
  task: str
  split: str         # original split name
  clip_id: str       # s4/ms3: video name; avss: uid
  category: str      # s4: category; ms3: ""; avss: subset label
  csv_path: Path
  line: int


@dataclasses.dataclass(frozen=True)
class ClipFiles:
  clip_dir: Path                 # must exist, or the CSV row is wrong
  frames: list[Path]
  masks: list[Path | None]       # None: no ground truth for that frame in this split
  wav: Path


def find_task_root(manual_dir, task: str) -> Path:
  """The folder holding the task's CSV: `manual_dir/<Single-source|...>` or manual_dir."""
  spec = TASKS[task]
  manual_dir = Path(manual_dir)
  for root in (manual_dir / spec.folder, manual_dir):
    if (root / spec.csv_name).is_file():
      return root
  raise AVSBenchError(
      f"{manual_dir / spec.folder / spec.csv_name}: not found (nor {manual_dir / spec.csv_name}); "
      f"pass the AVSBench root holding {spec.folder}/ as the manual dir")


def read_clips(root: Path, task: str, split: str) -> list[Clip]:
  """The CSV rows of one original split, in file order, with columns checked."""
  csv_path = Path(root) / TASKS[task].csv_name
  with open(csv_path, newline="", encoding="utf-8-sig") as f:
    rows = list(csv.reader(f))
  if not rows:
    raise AVSBenchError(f"{csv_path}: empty CSV")
  header = [h.strip() for h in rows[0]]
  need = ["uid", "label", "split"] if task == "avss" else ["split"]
  missing = [c for c in need if c not in header]
  if missing:
    raise AVSBenchError(f"{csv_path}: missing column(s) {missing} in header {header}")
  col = {c: header.index(c) for c in need}
  if task == "avss":
    col["id"], col["category"] = col["uid"], col["label"]
  else:                      # the original reads the name positionally (column 0)
    col["id"] = 0
    if task == "s4":
      col["category"] = header.index("category") if "category" in header else 2
  clips, seen = [], set()
  for line, row in enumerate(rows[1:], start=2):
    if not any(cell.strip() for cell in row):
      continue
    if len(row) <= max(col.values()):
      raise AVSBenchError(f"{csv_path}:{line}: {len(row)} columns, expected {len(header)}")
    row_split = row[col["split"]].strip()
    if row_split not in SPLITS.values():
      raise AVSBenchError(f"{csv_path}:{line}: unknown split {row_split!r} "
                          f"(expected one of {sorted(SPLITS.values())})")
    if row_split != split:
      continue
    clip_id = row[col["id"]].strip()
    category = row[col["category"]].strip() if "category" in col else ""
    if not clip_id:
      raise AVSBenchError(f"{csv_path}:{line}: empty clip name")
    if task == "avss" and category not in AVSS_SUBSETS:
      raise AVSBenchError(f"{csv_path}:{line}: unknown AVSS subset label {category!r} "
                          f"(expected one of {sorted(AVSS_SUBSETS)})")
    if clip_id in seen:
      raise AVSBenchError(f"{csv_path}:{line}: clip {clip_id!r} listed twice in split {split}")
    seen.add(clip_id)
    clips.append(Clip(task, split, clip_id, category, csv_path, line))
  return clips


def clip_files(root: Path, clip: Clip) -> ClipFiles:
  """Paths of one clip's frames, masks and wav, as the original builds them."""
  root, name, split, cat = Path(root), clip.clip_id, clip.split, clip.category
  if clip.task == "s4":
    base = root / "s4_data"
    frame_dir = base / "visual_frames" / split / cat / name
    mask_dir = base / "gt_masks" / split / cat / name
    frames = [frame_dir / f"{name}_{i}.png" for i in range(1, 6)]
    num_gt = 1 if split == "train" else 5
    masks = [mask_dir / f"{name}_{i}.png" if i <= num_gt else None for i in range(1, 6)]
    return ClipFiles(frame_dir, frames, masks,
                     base / "audio_wav" / split / cat / f"{name}.wav")
  if clip.task == "ms3":
    base = root / "ms3_data"
    frame_dir = base / "visual_frames" / name
    mask_dir = base / "gt_masks" / split / name
    return ClipFiles(frame_dir, [frame_dir / f"{name}.mp4_{i}.png" for i in range(1, 6)],
                     [mask_dir / f"{name}_{i}.png" for i in range(1, 6)],
                     base / "audio_wav" / split / f"{name}.wav")
  clip_dir = root / cat / name
  n, num_sup = AVSS_SUBSETS[cat]
  label_dir = clip_dir / "labels_rgb"
  # The original loads as many label maps as labels_rgb holds (.png files);
  # val/test must have one per frame, train at least the supervised ones.
  present = (sum(1 for p in label_dir.iterdir() if p.name.endswith(".png"))
             if label_dir.is_dir() else 0)
  need = num_sup if split == "train" else n
  if clip_dir.is_dir() and not (need <= present <= n):
    raise AVSBenchError(f"{label_dir}: {present} label maps (.png), expected "
                        f"{'at least ' + str(need) + ' and at most ' + str(n) if need < n else n} "
                        f"for a {cat} clip in split {split}")
  return ClipFiles(clip_dir, [clip_dir / "frames" / f"{i}.jpg" for i in range(n)],
                   [label_dir / f"{i}.png" if i < present else None for i in range(n)],
                   clip_dir / "audio.wav")


def temporal_flags(clip: Clip) -> tuple[np.ndarray, np.ndarray]:
  """(vid_flag, gt_flag) [T] float32 as the original sets them."""
  if clip.task == "avss":
    n, num_sup = AVSS_SUBSETS[clip.category]
    vid = [1.0] * n + [0.0] * (10 - n)
    gt = [1.0] * num_sup + [0.0] * (10 - num_sup)
  else:
    vid = [1.0] * 5
    gt = [1.0, 0, 0, 0, 0] if clip.task == "s4" and clip.split == "train" else [1.0] * 5
  return np.asarray(vid, np.float32), np.asarray(gt, np.float32)


def avss_palette(num_classes: int = AVSS_NUM_CLASSES) -> np.ndarray:
  """[num_classes, 3] uint8: the original's palette (shared with visualize)."""
  return visualize.palette(num_classes)


def read_label2idx(path) -> list[str]:
  """Class names in file order; the original asserts exactly 71 of them."""
  path = Path(path)
  if not path.is_file():
    raise AVSBenchError(f"{path}: not found (AVSS needs label2idx.json)")
  try:
    names = json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise AVSBenchError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(names, dict) or len(names) != AVSS_NUM_CLASSES:
    raise AVSBenchError(f"{path}: expected a JSON object with {AVSS_NUM_CLASSES} "
                        f"label -> index entries, got {type(names).__name__} of {len(names)}")
  return list(names)


def colours_to_classes(rgb: np.ndarray, palette: np.ndarray, path) -> np.ndarray:
  """[H,W,3] uint8 colour map -> [H,W] uint8 class index; unknown colour -> error."""
  codes = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
  pal_codes = (palette[:, 0].astype(np.int32) << 16) | (palette[:, 1].astype(np.int32) << 8) \
      | palette[:, 2]
  order = np.argsort(pal_codes)
  pos = np.clip(np.searchsorted(pal_codes[order], codes), 0, len(order) - 1)
  known = pal_codes[order][pos] == codes
  if not known.all():
    bad, counts = np.unique(codes[~known], return_counts=True)
    shown = ", ".join(f"({c >> 16},{(c >> 8) & 255},{c & 255}) x{n}"
                      for c, n in zip(bad[:5], counts[:5]))
    raise AVSBenchError(f"{path}: {len(bad)} colour(s) not in the {len(palette)}-class AVSS "
                        f"palette: {shown}{' ...' if len(bad) > 5 else ''}")
  return order[pos].astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
  """uint8 [H,W] or [H,W,3] -> PNG bytes. Encoding here (not in TFDS) keeps
  TensorFlow out of the build: TFDS stores encoded bytes as they are."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


def _open_image(path: Path, what: str) -> tuple[bytes, Image.Image]:
  if not path.is_file():
    raise AVSBenchError(f"{path}: missing {what}")
  data = path.read_bytes()
  try:
    im = Image.open(io.BytesIO(data))
    im.load()
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise AVSBenchError(f"{path}: corrupt {what}, cannot decode ({e})") from None
  return data, im


def load_log_mel(wav: Path, task: str) -> tuple[np.ndarray, bool]:
  """([T,96,64] float32 after the task's short-clip rule, is the wav silent)."""
  spec = TASKS[task]
  try:
    examples = audio.wav_file_to_examples(wav)
  except audio.AudioError as e:
    msg = str(e)
    raise AVSBenchError(msg if str(wav) in msg else f"{wav}: {msg}") from None
  silent = bool(examples.size) and bool(np.all(examples <= SILENT_LOG_MEL))
  return audio.fit_examples(examples, spec.num_frames, spec.pad_mode).astype(np.float32), silent


def load_clip(root: Path, clip: Clip, palette: np.ndarray | None = None) -> tuple[dict, bool]:
  """One TFDS example (features as in the contract) and whether its wav is silent.

  Images are PNG/JPEG bytes: frames already stored as 8-bit RGB PNG/JPEG are
  passed on as their file bytes (no re-encoding), others are converted to RGB
  (as the original's `convert("RGB")`) and PNG-encoded, as are the masks
  ([H,W] class / 0-1 maps). Raises AVSBenchError naming the offending file.
  """
  files = clip_files(root, clip)
  if not files.clip_dir.is_dir():
    raise AVSBenchError(f"{clip.csv_path}:{clip.line}: lists clip {clip.clip_id!r} "
                        f"but {files.clip_dir} does not exist")
  frames, sizes = [], []
  for path in files.frames:
    data, im = _open_image(path, "frame")
    eight_bit = im.format == "JPEG" or (im.format == "PNG" and data[24] == 8)  # IHDR depth
    frames.append(data if im.mode == "RGB" and eight_bit else _png(np.asarray(im.convert("RGB"))))
    if sizes and im.size != sizes[0]:
      raise AVSBenchError(f"{path}: frame is {im.size[0]}x{im.size[1]} but "
                          f"{files.frames[0].name} is {sizes[0][0]}x{sizes[0][1]}")
    sizes.append(im.size)
  masks = []
  for path, (w, h) in zip(files.masks, sizes):
    if path is None:
      masks.append(_png(np.zeros((h, w), np.uint8)))
      continue
    what = "label map" if clip.task == "avss" else "mask"
    _, im = _open_image(path, what)
    if im.size != (w, h):
      raise AVSBenchError(f"{path}: {what} is {im.size[0]}x{im.size[1]} but its frame is {w}x{h}")
    if clip.task == "avss":
      pal = avss_palette() if palette is None else palette
      m = colours_to_classes(np.asarray(im.convert("RGB")), pal, path)
    else:
      m = np.asarray(im.convert("1"), np.uint8)
    masks.append(_png(m))
  log_mel, silent = load_log_mel(files.wav, clip.task)
  vid_flag, gt_flag = temporal_flags(clip)
  example = {"clip_id": clip.clip_id, "category": clip.category, "frames": frames,
             "masks": masks, "log_mel": log_mel, "vid_flag": vid_flag, "gt_flag": gt_flag}
  return example, silent
