"""VGGish log-mel frontend: wav file -> examples [n, 96, 64] float32.

Matches the original's input pipeline (AudioSet VGGish `vggish_input.py` as
AVSegFormer uses it) to ~1e-6: mono mix of int16/32768 samples, resampy
`kaiser_best` to 16 kHz, 25 ms periodic-Hann frames every 10 ms, |rfft| with
512 points, VGGish's own HTK mel matrix, log(mel + 0.01), 96-frame examples.
Pure numpy/resampy/soundfile: it runs in the data pipeline, not under jit.
The end of the file pairs examples with a video's sampled frames (predict).

librosa is deliberately not used: `librosa.filters.mel(htk=True, norm=None)`
draws triangles linear in Hz where VGGish draws them linear in mel (weights
differ by up to 4.4e-3), and librosa's STFT centres a 400-sample window inside
a 512-sample frame, which shifts every frame by 56 samples.
"""
import os
import struct

import numpy as np
import resampy
import soundfile as sf

from avsegformer_jax import errors

SAMPLE_RATE = 16000
WINDOW_LENGTH = 400   # 25 ms at 16 kHz
HOP_LENGTH = 160      # 10 ms
FFT_LENGTH = 512      # next power of two above the window
NUM_MEL_BINS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01     # keeps log finite on silence: log(0.01) = -4.605
EXAMPLE_FRAMES = 96   # 0.96 s of 10 ms frames; examples do not overlap
# Shortest signal that yields one complete example: 400 + 95 * 160 samples.
MIN_SAMPLES = WINDOW_LENGTH + (EXAMPLE_FRAMES - 1) * HOP_LENGTH  # 15600 = 0.975 s
FIT_MODES = ("repeat_last", "zero_pad")


class AudioError(errors.InputError):
  """A wav file that cannot give VGGish examples; the message names the file."""


def _hertz_to_mel(hz):
  # HTK mel scale, natural-log form (VGGish's constants, not 2595*log10).
  return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)


def mel_matrix():
  """[257, 64] float64 weights: |rfft| bins -> mel bands.

  Triangles are linear in *mel* between 66 equally spaced mel edges, and the
  DC bin is zeroed (HTK excludes it), which is why we do not take librosa's.
  """
  bins_mel = _hertz_to_mel(np.linspace(0.0, SAMPLE_RATE / 2, FFT_LENGTH // 2 + 1))
  edges = np.linspace(_hertz_to_mel(MEL_MIN_HZ), _hertz_to_mel(MEL_MAX_HZ),
                      NUM_MEL_BINS + 2)
  lower, center, upper = edges[:-2], edges[1:-1], edges[2:]   # [64] each
  rising = (bins_mel[:, None] - lower) / (center - lower)     # [257, 64]
  falling = (upper - bins_mel[:, None]) / (upper - center)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  weights[0, :] = 0.0
  return weights


_MEL_MATRIX = mel_matrix()


def _periodic_hann(n):
  # Periodic (not symmetric) Hann, as VGGish uses: the STFT's own convention.
  return 0.5 - 0.5 * np.cos(2.0 * np.pi / n * np.arange(n))


def _frames(x, length, hop):
  """[L, ...] -> [num, length, ...] views, incomplete tail dropped."""
  num = 0 if x.shape[0] < length else 1 + (x.shape[0] - length) // hop
  if num == 0:
    return np.zeros((0, length) + x.shape[1:], x.dtype)
  win = np.lib.stride_tricks.sliding_window_view(x, length, axis=0)
  # sliding_window_view puts the window axis last: [L-length+1, ..., length].
  return np.moveaxis(win[::hop][:num], -1, 1)


def log_mel(waveform_16k):
  """Mono 16 kHz float signal [L] -> log-mel spectrogram [frames, 64] float64."""
  frames = _frames(np.asarray(waveform_16k, np.float64), WINDOW_LENGTH, HOP_LENGTH)
  spec = np.abs(np.fft.rfft(frames * _periodic_hann(WINDOW_LENGTH), FFT_LENGTH))
  return np.log(spec @ _MEL_MATRIX + LOG_OFFSET)


def to_mono_16k(samples, sample_rate):
  """[L] or [L, C] float samples -> mono float64 [L'] at 16 kHz (resampy kaiser_best)."""
  x = np.asarray(samples, np.float64)
  if x.ndim not in (1, 2):
    raise ValueError(f"audio samples must be [L] or [L, C], got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("audio samples contain NaN or inf")
  if int(sample_rate) != sample_rate or sample_rate <= 0:
    raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
  if x.ndim == 2:
    x = x.mean(axis=1)
  if sample_rate != SAMPLE_RATE and x.shape[0] > 0:
    x = resampy.resample(x, int(sample_rate), SAMPLE_RATE, filter="kaiser_best")
  return x


def mono_to_16k_in_pieces(mono, sample_rate, piece_seconds=60.0):
  """to_mono_16k of a long mono [L] signal, a piece at a time.

  Pieces start on the period of the two rates (so each output sample sits
  at the same filter phase as in one pass) and take 0.1 s of the signal on
  each side, far more than kaiser_best's 4 ms reach: the result is one
  pass's to float rounding, and the float64 copies are one piece's, not the
  whole soundtrack's (an hour at 48 kHz: ~4 GB less).
  """
  mono = np.asarray(mono)
  sample_rate = int(sample_rate)
  period = sample_rate // np.gcd(sample_rate, SAMPLE_RATE)   # input samples
  piece = max(1, int(piece_seconds * sample_rate) // period) * period
  if mono.ndim != 1 or mono.shape[0] <= piece:
    return to_mono_16k(mono, sample_rate)
  context = -(-int(0.1 * sample_rate) // period) * period
  total = int(mono.shape[0] * SAMPLE_RATE / sample_rate)     # as resampy
  out = np.empty(total, np.float64)
  for start in range(0, mono.shape[0], piece):
    lo = max(0, start - context)
    y = to_mono_16k(mono[lo:start + piece + context], sample_rate)
    o = (start - lo) * SAMPLE_RATE // sample_rate           # exact: period
    first = start * SAMPLE_RATE // sample_rate
    n = min(piece * SAMPLE_RATE // sample_rate, total - first)
    out[first:first + n] = y[o:o + n]
  return out


def waveform_to_examples(samples, sample_rate):
  """Float samples in [-1, 1], [L] or [L, C] -> VGGish examples [n, 96, 64] float32.

  n = number of complete 0.96 s examples (0 when shorter than MIN_SAMPLES at
  16 kHz); computed in float64 like the original and cast at the end.
  """
  mel = log_mel(to_mono_16k(samples, sample_rate))        # [F, 64]
  return _frames(mel, EXAMPLE_FRAMES, EXAMPLE_FRAMES).astype(np.float32)


def is_silent(samples, threshold=0.0):
  """True if no sample's magnitude exceeds `threshold` (default: all exact zeros).

  Silence is valid input (every log-mel value is log(0.01)); callers that want
  to flag such clips (e.g. broken audio extraction) can use this.
  """
  x = np.asarray(samples)
  return x.size == 0 or float(np.max(np.abs(x))) <= threshold


def _check_wav_not_truncated(path):
  """Raise AudioError if a RIFF/WAVE file's data chunk is cut short.

  libsndfile silently returns the frames that are present when the data
  chunk is shorter than its header says, so a half-copied file would give a
  shorter clip (and a wrong short-clip rule) without this check.
  """
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(12)
    if len(head) < 12 or head[:4] not in (b"RIFF", b"RIFX") or head[8:12] != b"WAVE":
      return                                  # not plain WAV: leave it to libsndfile
    endian = "<" if head[:4] == b"RIFF" else ">"
    pos = 12
    while pos + 8 <= size:
      f.seek(pos)
      chunk_id, chunk_size = struct.unpack(endian + "4sI", f.read(8))
      if chunk_id == b"data":
        have = size - pos - 8
        # 0 / 0xFFFFFFFF mark "length unknown" (streamed writers): not checkable.
        if chunk_size not in (0, 0xFFFFFFFF) and have < chunk_size:
          raise AudioError(
              f"{path}: truncated WAV file: the data chunk declares {chunk_size} "
              f"bytes but only {have} are present")
        return
      pos += 8 + chunk_size + (chunk_size & 1)  # chunks are padded to even size


def read_wav(path):
  """Path -> (samples float64 [L, C] scaled int16/32768, sample_rate); errors name the file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise AudioError(f"{path}: audio file does not exist")
  if not os.path.isfile(path):
    raise AudioError(f"{path}: not a regular file")
  if os.path.getsize(path) == 0:
    raise AudioError(f"{path}: audio file is empty (0 bytes)")
  _check_wav_not_truncated(path)
  try:
    # dtype int16 as the original: libsndfile converts other encodings to it.
    data, sample_rate = sf.read(path, dtype="int16", always_2d=True)
  except (sf.SoundFileError, RuntimeError, OSError) as e:
    raise AudioError(f"{path}: cannot read audio: {e}") from None
  if data.shape[0] == 0:
    raise AudioError(f"{path}: audio has no samples")
  return data / 32768.0, int(sample_rate)


def wav_file_to_examples(path):
  """Wav file -> VGGish examples [n, 96, 64] float32, n >= 1.

  Raises AudioError (a ValueError naming the file) for a missing, unreadable,
  truncated or empty file, or one too short for a single example. Silent
  audio is accepted (see is_silent).
  """
  samples, sample_rate = read_wav(path)
  examples = waveform_to_examples(samples, sample_rate)
  if examples.shape[0] == 0:
    raise AudioError(
        f"{path}: audio is {samples.shape[0] / sample_rate:.3f} s long; one VGGish "
        f"example needs at least {MIN_SAMPLES / SAMPLE_RATE:.3f} s")
  return examples


def fit_examples(examples, num, mode):
  """[n, 96, 64] -> [num, 96, 64]: truncate, or extend a short clip.

  "repeat_last" (S4/MS3: AVSBench's pre-made log-mel files repeat the last
  example) or "zero_pad" (AVSS: the model pads with all-zero examples, zeros
  in log-mel space, not log(0.01)).
  """
  examples = np.asarray(examples, np.float32)
  if examples.ndim != 3 or examples.shape[1:] != (EXAMPLE_FRAMES, NUM_MEL_BINS):
    raise ValueError(f"examples must be [n, {EXAMPLE_FRAMES}, {NUM_MEL_BINS}], "
                     f"got {examples.shape}")
  if mode not in FIT_MODES:
    raise ValueError(f"mode must be one of {FIT_MODES}, got {mode!r}")
  if num < 1:
    raise ValueError(f"num must be >= 1, got {num}")
  n = examples.shape[0]
  if n >= num:
    return examples[:num]
  if mode == "repeat_last":
    if n == 0:
      raise ValueError("repeat_last needs at least one example to repeat")
    pad = np.repeat(examples[-1:], num - n, axis=0)
  else:
    pad = np.zeros((num - n,) + examples.shape[1:], np.float32)
  return np.concatenate([examples, pad], axis=0)


def centred_example(mel: np.ndarray, t: float, audio_seconds: float):
  """The 0.96 s log-mel example [96, 64] centred on time t.

  `mel` rows are 10 ms hops from t = 0; near the start the window is moved
  right; near the end of the audio it is moved left while t is inside the
  audio, and filled with silence (log 0.01) beyond it.
  """
  n = EXAMPLE_FRAMES
  start = int(round(t * 100)) - n // 2
  if t < audio_seconds:
    start = min(start, mel.shape[0] - n)
  start = max(start, 0)
  rows = mel[start:start + n]
  if rows.shape[0] < n:
    pad = np.full((n - rows.shape[0], mel.shape[1]), np.log(LOG_OFFSET))
    rows = np.concatenate([rows, pad])
  return rows.astype(np.float32)


class AudioAligner:
  """One log-mel example [96, 64] per sampled video frame (predict).

  AVSBench sampling: clip w of `window` frames is seconds [wT, (w+1)T) and
  gets that audio's consecutive examples, as AVSBench computes a clip's
  (short clips extended by `pad_mode`); other samplings: the example
  centred on the frame's time.
  """

  def __init__(self, wave16k: np.ndarray, window: int, avsbench: bool,
               pad_mode: str):
    self.wave, self.window, self.avsbench = wave16k, window, avsbench
    self.pad_mode = pad_mode
    self.seconds = len(wave16k) / SAMPLE_RATE
    self._mel = None if avsbench else log_mel(wave16k)
    self._clip = (None, None)

  def _clip_examples(self, w: int) -> np.ndarray:
    """AVSBench: the T examples of clip w (seconds [wT, (w+1)T))."""
    if self._clip[0] != w:
      sr, t = SAMPLE_RATE, self.window
      seg = self.wave[w * t * sr:(w + 1) * t * sr]
      ex = waveform_to_examples(seg, sr)
      if ex.shape[0] == 0:   # < 0.975 s left: the last 0.975 s of the audio
        end = min(len(self.wave), (w + 1) * t * sr)
        ex = waveform_to_examples(
            self.wave[max(0, end - MIN_SAMPLES):end], sr)
        if ex.shape[0] == 0:   # audio ended long before: silence
          ex = np.full((1, EXAMPLE_FRAMES, NUM_MEL_BINS),
                       np.log(LOG_OFFSET), np.float32)
      self._clip = (w, fit_examples(ex, t, self.pad_mode))
    return self._clip[1]

  def example(self, index: int, t: float) -> np.ndarray:
    if self.avsbench:
      return self._clip_examples(index // self.window)[index % self.window]
    return centred_example(self._mel, t, self.seconds)
