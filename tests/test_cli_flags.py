"""The library's modules define no absl flags at import: the CLIs share
absl's global registry, so two modules defining `--config` at import made
importing both (e.g. predict and param_count in one process) fail."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK = """
import importlib, pkgutil
from absl import flags
import avsegformer_jax
import jax, orbax.checkpoint  # their own flags are not ours
before = set(flags.FLAGS)
for m in pkgutil.iter_modules(avsegformer_jax.__path__):
  importlib.import_module("avsegformer_jax." + m.name)
ours = {n for n in set(flags.FLAGS) - before
        if flags.FLAGS.find_module_defining_flag(n, "").startswith(
            ("avsegformer_jax", "configs", "datasets"))}
print(sorted(ours))
"""


def test_importing_every_module_defines_no_flags():
  # A fresh process: other tests in this one may have run a CLI's main.
  r = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip().splitlines()[-1] == "[]", r.stdout
