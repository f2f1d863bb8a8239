"""XLA:CPU settings the CLIs apply before JAX starts its backends.

jaxlib 0.10's CPU backend hands whole subgraphs (all of VGGish's convs and
FCs, the head's big matmuls) to its experimental YNNPACK fusion, which runs
this model several times slower than XLA's own CPU code: VGGish on 2
examples 1.94 s -> 0.33 s, the tiny model's eval forward 2.69 s -> 0.29 s,
and ~7x slower still below 9 frames per call (benchmarks/README.md). Single
dots, though, YNNPACK runs faster than XLA's Eigen GEMM (the head's
[15680,2048]x[2048,2048]: 1.32 s vs 1.83 s on 2 cores), so only those go to
it ("individual_dot"): S4 224 steps 3-16% faster than with no fusion at all.

jaxlib 0.11.2 and 0.12.0.1 (Python >= 3.12) are worse: with their default
fusion set the bfloat16 train-mode forward of the tiny config returns NaN
logits on CPU (the same program is finite with capture_intermediates, in
float32, on jaxlib 0.10.2, and with "individual_dot"; on 0.12 three
bfloat16 tests fail without it, NaN or wrong logits, and pass with it), so
the setting is applied there too.
"""
from __future__ import annotations

import os
from importlib import metadata

FLAGS = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
# An unknown XLA flag is fatal, so only for the jaxlib series that has it and
# that we checked (setup.cfg allows 0.10-0.12; 0.11.2 and 0.12.0.1 by hand).
_TESTED_JAXLIB = ("0.10.", "0.11.", "0.12.")


def configure() -> bool:
  """Limit the YNNPACK fusion to single dots; True if XLA_FLAGS changed.

  Call before the first JAX computation (XLA reads XLA_FLAGS when the
  backend starts). Leaves XLA_FLAGS alone when the user already chose a
  fusion type, when a GPU/TPU plugin is installed (its XLA may not know the
  flag), or on an untested jaxlib.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "ynn_fusion_type" in flags or _accelerator_plugin_installed():
    return False
  try:
    if not metadata.version("jaxlib").startswith(_TESTED_JAXLIB):
      return False
  except metadata.PackageNotFoundError:
    return False
  os.environ["XLA_FLAGS"] = (flags + " " + FLAGS).strip()
  return True


def _accelerator_plugin_installed() -> bool:
  if os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu":
    return False
  names = {(d.metadata["Name"] or "").lower()
           for d in metadata.distributions()}
  return any(n.startswith(("jax-cuda", "jax_cuda", "libtpu", "jax-rocm"))
             for n in names)
