"""AVSBench batches with grain, from the prepared TFDS dataset.

Random access through `tfds.data_source` (no TensorFlow needed to read),
a deterministic order that depends only on (seed, epoch), each JAX process
reading its own slice of every global batch, decoding/resizing in worker
processes, and an iterator whose state orbax saves with the train state, so
a resumed run continues at the exact next batch.

Batches (this process's clips, Bl = global batch / process count):
  frames [Bl,T,S,S,3] uint8 (resized RGB; padded frames 0), audio
  [Bl,T,96,64] float32, masks [Bl,T,S,S] uint8 (0/1, or AVSS class index),
  gt_flag / vid_flag [Bl,T] float32,
  clip_valid [Bl] float32 (0 = padding that fills the last batch),
  meta_clip_id / meta_category [Bl] str (host only).
The last batch of an epoch is padded instead of dropped (the original's
DataLoader keeps it): padded clips carry zero weights everywhere.
Frames stay uint8 up to the step (`train.normalize_frames` applies the
ImageNet normalisation on the device): a float32 batch is 4x the bytes to
pickle through the worker pipes and to copy to the device.
"""
from __future__ import annotations

import dataclasses
import io
import math
import signal

import grain
import numpy as np
from PIL import Image

from avsegformer_jax import errors

SPLITS = ("train", "validation", "test")
# Batches decoded ahead per process (main or worker), each in its own thread.
# grain's default (500 ahead, 16 threads) holds up to 500 decoded batches
# (~20 GB at 512 px, B=2) whenever the consumer is slower than the pipeline.
PREFETCH_BATCHES = 4


class PipelineError(errors.InputError):
  pass


def _encoded_images():
  """A TFDS decoder that hands over a Sequence(Image)'s PNG/JPEG bytes.

  Why: TFDS decodes every image of an example (S4 training may need one of
  five), and with OpenCV installed it decodes JPEGs with OpenCV, whose
  pixels can differ from PIL's; the original reads frames with PIL.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  class EncodedImages(tfds.decode.SkipDecoding):
    def decode_batch_example_np(self, serialized):   # the NumPy path
      return serialized
  return EncodedImages()


def open_source(config, split):
  """tfds.data_source over the prepared `avsbench/<task>` split; frames and
  masks stay encoded until `ClipLoader` decodes the ones it uses."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if split not in SPLITS:
    raise PipelineError(f"split must be one of {SPLITS}, got {split!r}")
  data_dir = config.data.data_dir or None
  name = f"{config.data.name}/{config.task}"
  try:
    return tfds.data_source(
        name, split=split, data_dir=data_dir,
        decoders={"frames": _encoded_images(), "masks": _encoded_images()})
  except Exception as e:  # tfds raises several types for a missing dataset
    # TFDS's message runs to a dozen lines (every registered dataset...):
    # its first line says what is missing.
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    raise PipelineError(
        f"cannot open {name} split {split!r} in data_dir "
        f"{data_dir or '(TFDS default)'}: {first} Prepare it first: python "
        f"-m datasets.avsbench.prepare --config={config.task} "
        f"--manual_dir=RAW_AVSBENCH --data_dir={data_dir or 'DATA_DIR'}"
    ) from e


def _image(x) -> Image.Image:
  """PNG/JPEG bytes (our source) or a decoded array (a source that decodes)."""
  if isinstance(x, bytes):                  # np.bytes_ is a bytes too
    img = Image.open(io.BytesIO(x))
    img.load()
    return img
  x = np.asarray(x, np.uint8)
  return Image.fromarray(x[..., 0] if x.ndim == 3 and x.shape[-1] == 1 else x)


def _resize(pil: Image.Image, size: int, crop: bool, nearest: bool):
  """PIL resizes as the original's loaders (bilinear with PIL's antialias
  for frames, nearest for masks); `crop`: short side to `size`, centre crop."""
  method = Image.NEAREST if nearest else Image.BILINEAR
  if not crop:
    return np.asarray(pil.resize((size, size), method))
  w, h = pil.size
  if w > h:
    oh, ow = size, int(1.0 * w * size / h)
  else:
    ow, oh = size, int(1.0 * h * size / w)
  pil = pil.resize((ow, oh), method)
  x1, y1 = int(round((ow - size) / 2.0)), int(round((oh - size) / 2.0))
  return np.asarray(pil.crop((x1, y1, x1 + size, y1 + size)))


@dataclasses.dataclass
class ClipLoader:
  """Global clip position -> one decoded, resized clip (runs in workers)."""
  source: object
  num_frames: int
  image_size: int
  crop: bool                    # AVSS train: short-side resize + centre crop
  num_clips: int
  global_batch: int
  local_batch: int              # this process's clips of a batch (at most)
  process_index: int
  batches_per_epoch: int
  shuffle: bool
  seed: int
  slots: int            # rows per process batch (eval: padded to its devices)
  audio_perm: np.ndarray | None = None   # shuffled-audio control
  where: str = "the prepared dataset"     # named when a record is unreadable

  def _order(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_clips)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_clips)

  def __call__(self, i: int):
    epoch, r = divmod(int(i), self.batches_per_epoch * self.slots)
    b, k = divmod(r, self.slots)
    j = self.process_index * self.local_batch + k     # place in the batch
    pos = b * self.global_batch + j
    valid = k < self.local_batch and j < self.global_batch and \
        pos < self.num_clips
    idx = int(self._order(epoch)[pos % self.num_clips])
    return self.load(idx, valid)

  @staticmethod
  def _decode(ex, idx, key, j, x) -> Image.Image:
    try:
      return _image(x)
    except (OSError, ValueError) as e:      # PIL: truncated / not an image
      raise PipelineError(
          f"clip {_text(ex['clip_id'])!r} (example {idx}): {key}[{j}] cannot "
          f"be decoded ({e}); prepare the dataset again") from e

  def _read(self, idx: int):
    try:
      return self.source[idx]
    except RuntimeError as e:     # array_record: a truncated / corrupt file
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise PipelineError(
          f"example {idx} of {self.where} cannot be read ({first}); prepare "
          "it again (datasets.avsbench.prepare --overwrite)") from e

  def load(self, idx: int, valid: bool = True):
    ex = self._read(idx)
    t, s = self.num_frames, self.image_size
    frames = np.zeros((t, s, s, 3), np.uint8)
    masks = np.zeros((t, s, s), np.uint8)
    stored = list(ex["frames"])[:t]
    for j, img in enumerate(stored):
      img = self._decode(ex, idx, "frames", j, img)
      img = img if img.mode == "RGB" else img.convert("RGB")  # as the original
      frames[j] = _resize(img, s, self.crop, nearest=False)
    for j, m in enumerate(list(ex["masks"])[:t]):
      m = self._decode(ex, idx, "masks", j, m)
      masks[j] = _resize(m, s, self.crop, nearest=True)
    vid_flag = np.asarray(ex["vid_flag"], np.float32)[:t]
    if int(vid_flag.sum()) != len(stored):   # the step zeroes frames by vid_flag
      raise PipelineError(
          f"clip {_text(ex['clip_id'])!r} (example {idx}) has {len(stored)} of "
          f"its first {t} frames but vid_flag {vid_flag.tolist()}: the prepared "
          "dataset is inconsistent; prepare it again")
    audio = np.asarray(ex["log_mel"], np.float32)
    if self.audio_perm is not None:
      audio = np.asarray(self._read(int(self.audio_perm[idx]))["log_mel"],
                         np.float32)
    w = np.float32(valid)
    return {
        "frames": frames, "audio": audio[:t], "masks": masks,
        "gt_flag": np.asarray(ex["gt_flag"], np.float32)[:t] * w,
        "vid_flag": vid_flag,
        "clip_valid": w,
        # The clip's index in its split: which clips to visualise does not
        # depend on how the batch is split over processes.
        "meta_index": np.int64(idx),
        "meta_clip_id": np.asarray(_text(ex["clip_id"])),
        "meta_category": np.asarray(_text(ex["category"])),
    }


def _text(x):
  return x.decode() if isinstance(x, bytes) else str(x)


def _frames(config, train: bool, train_frames: int | None) -> int:
  """Frames per clip; training may keep only the first `train_num_frames`
  (S4 supervises frame 0 only, and with PVTv2, which has no batch norm, the
  other frames add nothing to the gradient: a T-fold cheaper step), or, when
  that is not set, the `train_frames` the trainer asks for."""
  n = config.data.num_frames
  if not train:
    return n
  k = config.data.get("train_num_frames", -1)
  if k > n:
    raise PipelineError(f"data.train_num_frames={k} > data.num_frames={n}")
  return k if k > 0 else min(train_frames or n, n)


_WARNED = set()


def _check_frames(t: int, loader: ClipLoader, train: bool) -> None:
  """`data.num_frames` against the frames a clip holds (its vid_flag's
  length: 5 in S4/MS3, 10 in AVSS). More failed inside the traced step
  (frames and audio padded apart); fewer is scored on the first ones only,
  which is not the benchmark's protocol: said once."""
  stored = len(loader._read(0)["vid_flag"])  # pylint: disable=protected-access
  if t > stored:
    raise PipelineError(
        f"data.num_frames={t}, but the clips of {loader.where} hold {stored} "
        f"frames: use --config.data.num_frames={stored}")
  if t < stored and not train and (loader.where, t) not in _WARNED:
    _WARNED.add((loader.where, t))
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("data.num_frames=%d: scoring the first %d of the %d "
                    "frames of each clip of %s, not the benchmark's protocol",
                    t, t, stored, loader.where)


def _derangement(n: int, seed: int) -> np.ndarray:
  """A permutation without fixed points: every clip gets another's audio."""
  if n < 2:
    raise PipelineError("shuffling audio across clips needs at least 2 clips")
  rng = np.random.default_rng(seed)
  while True:
    p = rng.permutation(n)
    if not np.any(p == np.arange(n)):
      return p


def create_dataset(config, split: str, *, train: bool, num_epochs: int = 1,
                   seed: int | None = None, batch_size: int | None = None,
                   process_index: int | None = None,
                   process_count: int | None = None, source=None,
                   shuffle_audio: bool = False, num_workers: int | None = None,
                   train_frames: int | None = None, start_batch: int = 0,
                   devices: int | None = None):
  """Returns (grain IterDataset of this process's batches, info dict);
  `train_frames`: the first frames of each training clip to load
  (`train.clip_frames`) unless `data.train_num_frames` says otherwise;
  `start_batch`: the first batch of the run to yield (a resumed run's step:
  batches are a pure function of their index); `devices`: this process's
  (default: JAX's local devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  source = open_source(config, split) if source is None else source
  n = len(source)
  if n == 0:
    raise PipelineError(f"split {split!r} of {config.task} is empty")
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  gb = batch_size or (config.train.batch_size if train else
                      config.eval.batch_size)
  ldc = jax.local_device_count() if devices is None else devices
  if train and gb % (pc * ldc):
    # (BatchNorm's statistics and the loss would count padding clips)
    raise PipelineError(
        f"a training batch of {gb} clips (train.batch_size) does not split "
        f"evenly over the {pc * ldc} devices ({pc} process(es) x {ldc})")
  # Evaluation pads each process's part of a batch to its devices with
  # clips that count nowhere (clip_valid 0): the batches, and the per-batch
  # averages, stay those of eval.batch_size.
  lb = -(-gb // pc)
  bpe = math.ceil(n / gb)
  seed = config.data.shuffle_seed if seed is None else seed
  loader = ClipLoader(
      source=source, num_frames=_frames(config, train, train_frames),
      image_size=config.data.image_size,
      crop=train and config.task == "avss", num_clips=n, global_batch=gb,
      local_batch=lb, process_index=pi, batches_per_epoch=bpe, shuffle=train,
      seed=seed, slots=-(-lb // ldc) * ldc,
      audio_perm=_derangement(n, seed + 1) if shuffle_audio else None,
      where=f"{config.data.name}/{config.task} split {split!r} in "
      f"{config.data.data_dir or 'the TFDS data dir'}")
  _check_frames(config.data.num_frames, loader, train)
  ds = grain.MapDataset.range(num_epochs * bpe * loader.slots).map(
      loader).batch(loader.slots)
  if start_batch:
    ds = ds[start_batch:]
  ahead = config.data.get("prefetch_batches", PREFETCH_BATCHES)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=ahead,
                                            prefetch_buffer_size=ahead))
  workers = config.data.num_workers if num_workers is None else num_workers
  if workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():   # grain workers read absl flags
      flags.FLAGS.mark_as_parsed()
    _start_resource_tracker()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers),
                        worker_init_fn=_ignore_stop_signals)
  info = dict(num_clips=n, batches_per_epoch=bpe, global_batch=gb,
              local_batch=lb, num_epochs=num_epochs)
  return ds, info


def _ignore_stop_signals(worker_index: int, worker_count: int) -> None:
  """In each worker process: a terminal's Ctrl-C (SIGINT), or its hangup
  (SIGHUP), reaches every process of its group; each worker printed a
  KeyboardInterrupt traceback, or died, taking the main process's next
  batch with it. The main process stops them (`close`), after saving its
  step."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGHUP, signal.SIG_IGN)


def _start_resource_tracker() -> None:
  """Starts multiprocessing's resource tracker (it accounts for the shared
  memory of the workers' batches) with SIGHUP blocked, which it keeps: it
  ignores a Ctrl-C by itself, but a terminal's hangup killed it, and the
  workers that relaunched it printed a traceback per batch in flight."""
  from multiprocessing import resource_tracker  # pylint: disable=g-import-not-at-top
  if not hasattr(signal, "pthread_sigmask"):
    return
  before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
  try:
    resource_tracker.ensure_running()
  finally:
    signal.pthread_sigmask(signal.SIG_SETMASK, before)


def close(iterator) -> None:
  """Stops a grain iterator's worker processes now (grain's exit-time
  finalizer raced with them and printed a traceback after an error's line),
  and waits until the shared memory of the batches they sent is released.
  grain releases it on a daemon thread that the interpreter's exit cuts
  short; the resource tracker then unlinks what is left and warns of
  "leaked shared_memory objects" at the end of every run with
  `data.num_workers` > 0."""
  getattr(iterator, "close", lambda: None)()
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
    arrays = shared_memory_array.SharedMemoryArray
    pool = arrays._del_thread_pool  # pylint: disable=protected-access
    if pool is not None:
      arrays._disable_async_del()  # later releases: at once, in place   # pylint: disable=protected-access
      pool.close()
      pool.join()
  except (ImportError, AttributeError):   # another grain: only the warning
    pass
