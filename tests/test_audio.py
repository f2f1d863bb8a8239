"""VGGish log-mel frontend against goldens/audio_frontend.npz (1e-4 abs), and bad files."""
import numpy as np
import pytest
import soundfile as sf

from avsegformer_jax import audio

G = dict(np.load("tests/goldens/audio_frontend.npz"))


def max_err(x, ref):
  assert x.shape == ref.shape, (x.shape, ref.shape)
  return float(np.max(np.abs(x.astype(np.float64) - ref)))


@pytest.fixture(scope="module")
def b_wav(tmp_path_factory):
  path = tmp_path_factory.mktemp("wav") / "b.wav"
  path.write_bytes(G["b_wav_file_bytes"].tobytes())
  return path


def write_pcm16(path, samples, sample_rate=16000):
  sf.write(str(path), samples, sample_rate, subtype="PCM_16")
  return path


def test_case_a_waveform_16k():
  out = audio.waveform_to_examples(G["a_waveform"], int(G["a_sample_rate"]))
  assert out.dtype == np.float32
  assert max_err(out, G["a_examples"][:, 0]) <= 1e-4


def test_case_b_wav_file_44k_stereo(b_wav):
  out = audio.wav_file_to_examples(b_wav)
  assert out.dtype == np.float32
  assert max_err(out, G["b_examples"][:, 0]) <= 1e-4
  samples, sample_rate = audio.read_wav(b_wav)
  assert sample_rate == int(G["b_sample_rate"]) and samples.shape[1] == 2
  assert max_err(audio.to_mono_16k(samples, sample_rate), G["b_resampled_16k"]) <= 1e-6


def test_case_c_short_clip_rules(b_wav):
  b = audio.wav_file_to_examples(b_wav)                      # 4 examples
  s4 = audio.fit_examples(b, 5, "repeat_last")
  avss = audio.fit_examples(b, 10, "zero_pad")
  assert max_err(s4, G["c_s4_ms3_examples"][:, 0]) <= 1e-4
  assert max_err(avss, G["c_avss_examples"][:, 0]) <= 1e-4
  np.testing.assert_array_equal(audio.fit_examples(b, 3, "zero_pad"), b[:3])


def test_mel_matrix_vggish_construction():
  w = audio.mel_matrix()
  assert w.shape == (257, 64)
  assert np.all(w[0] == 0)                                     # DC excluded
  hz = np.linspace(0, 8000, 257)
  assert np.all(w[(hz < 125) | (hz > 7500)] == 0)
  assert np.all(w.max(axis=0) > 0.5) and np.all(w.max(axis=0) <= 1.0)


def test_stereo_mix_is_channel_mean():
  rng = np.random.RandomState(0)
  x = rng.uniform(-0.5, 0.5, (16000, 2))
  np.testing.assert_allclose(audio.waveform_to_examples(x, 16000),
                             audio.waveform_to_examples(x.mean(1), 16000), atol=1e-6)


def test_length_boundary_and_silence(tmp_path):
  n = audio.MIN_SAMPLES
  ok = write_pcm16(tmp_path / "ok.wav", np.zeros(n, np.int16))
  out = audio.wav_file_to_examples(ok)                         # silent is valid
  assert out.shape == (1, 96, 64)
  np.testing.assert_allclose(out, np.log(0.01), rtol=1e-6)
  assert audio.is_silent(audio.read_wav(ok)[0])
  assert not audio.is_silent(np.array([0.0, 1e-4]))
  short = write_pcm16(tmp_path / "short.wav", np.zeros(n - 1, np.int16))
  with pytest.raises(audio.AudioError, match="short.wav.*0.975 s"):
    audio.wav_file_to_examples(short)
  assert audio.waveform_to_examples(np.zeros(n - 1), 16000).shape == (0, 96, 64)


@pytest.mark.parametrize("name,content,match", [
    ("empty.wav", b"", "empty"),
    ("garbage.wav", b"not audio at all " * 20, "cannot read"),
    ("header_cut.wav", None, "cannot read"),          # RIFF header cut at 30 bytes
    ("data_cut.wav", None, "truncated"),              # header says more data than present
    ("no_samples.wav", None, "no samples"),           # valid header, 0 frames
])
def test_bad_files_name_the_file(tmp_path, name, content, match):
  wav = G["b_wav_file_bytes"].tobytes()
  if content is None:
    content = {"header_cut.wav": wav[:30], "data_cut.wav": wav[:200000],
               "no_samples.wav": wav[:40] + b"\0\0\0\0"}[name]
  path = tmp_path / name
  path.write_bytes(content)
  with pytest.raises(audio.AudioError, match=f"{name}.*{match}"):
    audio.wav_file_to_examples(path)


def test_missing_file_names_the_file(tmp_path):
  with pytest.raises(audio.AudioError, match="nowhere.wav.*does not exist"):
    audio.wav_file_to_examples(tmp_path / "nowhere.wav")
  assert issubclass(audio.AudioError, ValueError)


def test_fit_examples_rejects_bad_requests():
  with pytest.raises(ValueError, match="mode"):
    audio.fit_examples(np.zeros((1, 96, 64)), 5, "loop")
  with pytest.raises(ValueError, match="at least one"):
    audio.fit_examples(np.zeros((0, 96, 64)), 5, "repeat_last")
  assert audio.fit_examples(np.zeros((0, 96, 64)), 2, "zero_pad").shape == (2, 96, 64)
  with pytest.raises(ValueError, match=r"\[n, 96, 64\]"):
    audio.fit_examples(np.zeros((2, 64, 96)), 5, "zero_pad")


@pytest.mark.parametrize("rate", [48000, 44100, 22050, 16000, 8000])
def test_resampling_in_pieces_is_one_pass(rate):
  """Pieces of ~2 s (on the rates' period, with context) give the one-pass
  resampling: bit for bit at integer ratios, to rounding otherwise. A piece
  that started off the period, or without context, would be off by far
  more (a phase shift; the filter's edge at every boundary)."""
  x = np.random.default_rng(rate).normal(0, 0.1, int(7.3 * rate) + 17)
  x = x.astype(np.float32)
  whole = audio.to_mono_16k(x, rate)
  pieces = audio.mono_to_16k_in_pieces(x, rate, piece_seconds=1.99)
  assert pieces.shape == whole.shape
  np.testing.assert_allclose(pieces, whole, rtol=0, atol=1e-10)
  if 16000 % rate == 0 or rate % 16000 == 0:
    np.testing.assert_array_equal(pieces, whole)


def test_audio_examples_per_frame():
  rng = np.random.default_rng(0)
  wave = rng.normal(0, 0.1, int(12.3 * 16000))
  a = audio.AudioAligner(wave, 5, avsbench=True, pad_mode="repeat_last")
  # AVSBench: clip w = seconds [5w, 5w+5), its consecutive 0.96 s examples.
  clip1 = audio.waveform_to_examples(wave[5 * 16000:10 * 16000], 16000)
  np.testing.assert_array_equal(a.example(7, 7.92), clip1[2])
  # The last clip has 2.3 s: 2 examples, repeated to T like S4's rule.
  last = audio.waveform_to_examples(wave[10 * 16000:], 16000)
  assert last.shape[0] == 2
  np.testing.assert_array_equal(a.example(14, 0.0), last[1])
  # Centred: the example whose middle is at t; clamped at both ends.
  c = audio.AudioAligner(wave, 5, avsbench=False, pad_mode="repeat_last")
  mel = audio.log_mel(wave).astype(np.float32)
  np.testing.assert_array_equal(c.example(0, 3.0), mel[252:348])
  np.testing.assert_array_equal(c.example(0, 0.1), mel[:96])
  np.testing.assert_array_equal(c.example(0, 12.29), mel[-96:])
  beyond = c.example(0, 13.0)   # after the audio: silence
  np.testing.assert_allclose(beyond[-20:], np.log(0.01), rtol=1e-6)
