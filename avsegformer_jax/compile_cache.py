"""XLA's persistent compilation cache, on by default in the CLIs.

A run compiles its programs (the random init, the train step with the
backbone frozen and again unfrozen, the eval step) before its first step:
minutes on a GPU host for the real models (benchmarks/README.md: the S4
PVTv2-B5 train step alone is ~76 s of XLA:GPU work without autotuning).
JAX can keep compiled executables on disk, keyed by the program, the
compile options, the device and the jax/jaxlib versions, so a resumed,
repeated or evaluation run loads them instead of compiling again. A hit is
the same executable, so results do not change.
"""
from __future__ import annotations

import os

DEFAULT_DIR = os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
    "avsegformer_jax", "xla")
ENV = "JAX_COMPILATION_CACHE_DIR"


def enable(path: str | None = DEFAULT_DIR) -> str | None:
  """Point JAX's persistent cache at `path` ("" or None: off) and return the
  folder in use. $JAX_COMPILATION_CACHE_DIR, which JAX reads itself, wins
  (an empty value turns the cache off). Call before the first compile."""
  if ENV in os.environ:
    return os.environ[ENV] or None
  if not path:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  from avsegformer_jax import files  # pylint: disable=g-import-not-at-top
  path = files.absolute(path)        # a gs:// URL too: JAX takes it
  if not files.is_url(path):
    os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  return path
