"""Test-session setup.

XLA's persistent compilation cache: on 2 CPU cores most of a tiny-model test
is compilation (a train step ~20-40 s, the random init ~30 s), and the
trainer tests run the same programs in several subprocesses (reference run,
killed run, resumed run). Every program is still compiled at least once per
fresh cache; the key covers the HLO, the options and the JAX version, so a
hit is the same executable. Set JAX_COMPILATION_CACHE_DIR to choose the
folder (an empty value turns the cache off).
"""
import os
import tempfile

# Before JAX is imported (conftest loads first); subprocesses inherit it.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), "avsegformer-jax-test-xla-cache"))

# The CLIs limit XLA:CPU's YNNPACK fusion to single dots (avsegformer_jax/xla_cpu.py);
# the tests run what users run (and several times faster).
from avsegformer_jax import xla_cpu  # pylint: disable=g-import-not-at-top,wrong-import-position

xla_cpu.configure()

import jax  # noqa: E402  pylint: disable=wrong-import-position
import pytest  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture
def cudnn_as_xla(monkeypatch):
  """`jax.nn.dot_product_attention` with "cudnn" run by its XLA
  implementation: the cuDNN path's padding, lengths, layout and fallbacks
  checked on a CPU (the kernel itself needs an NVIDIA GPU)."""
  real = jax.nn.dot_product_attention
  calls = []

  def fake(*args, implementation=None, **kwargs):
    calls.append((implementation, kwargs.get("key_value_seq_lengths")))
    return real(*args, implementation="xla", **kwargs)
  monkeypatch.setattr(jax.nn, "dot_product_attention", fake)
  return calls



@pytest.fixture(scope="session")
def video(tmp_path_factory):
  """12 s, 25 fps, 64 px mp4 (H.264 + AAC 44.1 kHz stereo): circle, square,
  triangle sound 4 s each (test_predict, test_video_io)."""
  from avsegformer_jax import synthetic_video  # pylint: disable=g-import-not-at-top
  return synthetic_video.write(tmp_path_factory.mktemp("v") / "s.mp4", size=64)


@pytest.fixture
def stub_model(monkeypatch):
  """predict with `predict_stub.stub_forward` for the model, and whatever
  variables it is given."""
  from avsegformer_jax import predict  # pylint: disable=g-import-not-at-top
  import predict_stub  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(predict, "_make_forward", predict_stub.stub_forward)
  monkeypatch.setattr(predict.checkpoint, "fit_variables", lambda v, *a: v)
  return {"params": {}}
