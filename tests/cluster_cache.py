"""The persistent XLA compilation cache for every process of a test's
localhost JAX cluster, not process 0 alone.

JAX writes cache entries from process 0 only, and on CPU a program's key
holds the topology of the process that compiles it (its own devices). So
process 1 missed in every run and compiled each program afresh, and its
peers waited for it at the first collective: ~2 min of each tiny-model
cluster run on 2 cores, most of what the multi-process tests took. The
processes here share one machine and one cache folder, so each may write
its own entries (the same programs, now also found by process 1).

Test-only: it swaps JAX's private writer, and leaves it alone where that
is not the one known here (JAX 0.10-0.12); the tests are then slower, not
wrong.
"""
import inspect

_WRITE = ["cache_key", "compile_time_secs", "module_name", "backend",
          "executable"]
_PUT = ["cache_key", "module_name", "executable", "backend", "compile_time"]


def enable():
  """Returns whether the writer is swapped. Call before or after
  `jax.distributed.initialize`: the process index is read at each write."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import compilation_cache, compiler, distributed  # pylint: disable=g-import-not-at-top
  write = getattr(compiler, "_cache_write", None)
  put = getattr(compilation_cache, "put_executable_and_time", None)
  if getattr(write, "_every_process", False):
    return True
  if (write is None or put is None
      or list(inspect.signature(write).parameters)[:5] != _WRITE
      or list(inspect.signature(put).parameters) != _PUT):
    return False

  def write_from_any_process(cache_key, compile_time_secs, module_name,
                             backend, executable, *host_callbacks):
    if distributed.global_state.process_id == 0:
      return write(cache_key, compile_time_secs, module_name, backend,
                   executable, *host_callbacks)
    if (any(host_callbacks) or compile_time_secs <
        jax.config.jax_persistent_cache_min_compile_time_secs):
      return None           # what JAX's writer skips too
    return put(cache_key, module_name, executable, backend,
               int(compile_time_secs))

  write_from_any_process._every_process = True  # pylint: disable=protected-access
  compiler._cache_write = write_from_any_process  # pylint: disable=protected-access
  return True
