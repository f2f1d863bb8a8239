"""Acceptance check: a `.pth` that real torch wrote converts and reproduces
goldens/model_s4_res50.npz (max |error| of pred and mask_feature <= 1e-4).

torch is never a dependency of the project; run this where some interpreter
has it (a separate venv is enough: `python3.11 -m venv /tmp/tv &&
/tmp/tv/bin/pip install torch`):

    python tests/check_torch_roundtrip.py --torch_python=/tmp/tv/bin/python

(`--torch_python` may be left out when this interpreter has torch.)
1. torch, in its own interpreter, builds the golden's synthetic weights
   (reference/synth_weights.py, state_dict_s4_res50.tsv, seed 0) and saves
   them twice: zip format as a plain OrderedDict, and the legacy format as
   {'state_dict': {'module.' + name: ...}, 'epoch': 3}.
2. Here, without torch: `torch_io.load_state_dict` reads both; every array
   must equal the synthetic weights bit for bit.
3. `convert.torch_to_flax` -> the model on the golden's inputs -> compare.
4. Back: those variables -> `export_pth` -> a `.pth` that torch, in its own
   interpreter, loads with `torch.load(weights_only=True)`: every tensor must
   equal the synthetic weights (the original's never-used ones: zeros).
   `--keep_export=FILE` keeps it, for the original's own parity run:
   `benchmarks/original/time_original.py --mode=parity --weights=FILE`.
tests/test_torch_io.py runs the same function when torch (or $TORCH_PYTHON)
is available.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TSV = os.path.join(HERE, "reference", "state_dict_s4_res50.tsv")
GOLDEN = os.path.join(HERE, "goldens", "model_s4_res50.npz")

_WRITER = r"""
import collections, sys, torch
sys.path.insert(0, sys.argv[1])
from synth_weights import synth_state_dict
sd = synth_state_dict(sys.argv[2], seed=int(sys.argv[3]))
t = collections.OrderedDict((k, torch.from_numpy(v)) for k, v in sd.items())
torch.save(t, sys.argv[4])
nested = collections.OrderedDict(("module." + k, v) for k, v in t.items())
torch.save({"state_dict": nested, "epoch": 3}, sys.argv[5],
           _use_new_zipfile_serialization=False)
print(torch.__version__)
"""


_LOADER = r"""
import sys, numpy as np, torch
sd = torch.load(sys.argv[1], weights_only=True)
assert type(sd).__name__ == "OrderedDict", type(sd)
np.savez(sys.argv[2], **{k: v.numpy() for k, v in sd.items()})
print(torch.__version__)
"""


def read_with_torch(pth, workdir, torch_python=None):
  """{name: array} as torch.load(weights_only=True) reads `pth`."""
  npz = os.path.join(workdir, "torch_read.npz")
  subprocess.run([torch_python or sys.executable, "-c", _LOADER, pth, npz],
                 check=True, capture_output=True, text=True)
  with np.load(npz) as f:
    return {k: f[k] for k in f.files}


def write_with_torch(workdir, seed, torch_python=None):
  """(zip path, legacy path, torch version) written by real torch."""
  zip_path = os.path.join(workdir, "s4_res50_zip.pth")
  legacy_path = os.path.join(workdir, "s4_res50_legacy.pth")
  out = subprocess.run(
      [torch_python or sys.executable, "-c", _WRITER,
       os.path.join(HERE, "reference"), TSV, str(seed), zip_path,
       legacy_path], check=True, capture_output=True, text=True)
  return zip_path, legacy_path, out.stdout.strip().splitlines()[-1]


def roundtrip(workdir, torch_python=None, verbose=False, keep_export=None):
  """Max abs errors against the golden (plus sizes and timings)."""
  sys.path.insert(0, REPO)
  sys.path.insert(0, os.path.join(HERE, "reference"))
  from avsegformer_jax import avsegformer, convert, torch_io
  from configs import s4
  from synth_weights import synth_state_dict

  g = dict(np.load(GOLDEN))
  seed = int(g["meta_weight_seed"])
  t0 = time.time()
  zip_path, legacy_path, version = write_with_torch(workdir, seed,
                                                    torch_python)
  info = {"torch": version, "zip_MB": os.path.getsize(zip_path) / 2**20,
          "legacy_MB": os.path.getsize(legacy_path) / 2**20,
          "write_s": time.time() - t0}
  t0 = time.time()
  sd = torch_io.load_state_dict(zip_path)
  info["read_zip_s"] = time.time() - t0
  legacy = torch_io.load_state_dict(legacy_path)
  ref = synth_state_dict(TSV, seed=seed)
  for name, got in (("zip", sd), ("legacy", legacy)):
    if sorted(got) != sorted(ref):
      raise AssertionError(f"{name}: keys differ: {set(got) ^ set(ref)}")
    for k, v in ref.items():
      if got[k].dtype != v.dtype or not np.array_equal(got[k], v):
        raise AssertionError(f"{name}: {k} differs from the weights saved")
  info["num_tensors"] = len(sd)

  config = s4.get_config("res50")
  variables, report = convert.torch_to_flax(sd, config, return_report=True)
  assert not report["unknown"], report["unknown"][:5]
  model = avsegformer.build_model(config)
  frames = g["frames"].transpose(0, 2, 3, 1)               # NCHW -> NHWC
  audio = g["audio"][:, 0]
  fwd = jax.jit(lambda v, f, a: model.apply(v, f, a,
                                            mutable=["intermediates"]))
  with jax.default_matmul_precision("highest"):
    (logits, mask_feature), state = fwd(variables, frames, audio)
  err = lambda a, b: float(np.abs(np.asarray(a, np.float64) - b).max())
  errs = {
      "pred": err(np.asarray(logits).transpose(0, 3, 1, 2), g["pred"]),
      "mask_feature": err(np.asarray(mask_feature).transpose(0, 3, 1, 2),
                          g["mask_feature"]),
      "vggish": err(state["intermediates"]["vggish_embedding"][0],
                    g["vggish"]),
      "max_abs_pred_ref": float(np.abs(g["pred"]).max()),
  }
  from avsegformer_jax import export_pth
  pth = keep_export or os.path.join(workdir, "export.pth")
  export_pth.save(pth, export_pth.state_dict(variables, config))
  back = read_with_torch(pth, workdir, torch_python)
  if sorted(back) != sorted(ref):
    raise AssertionError(f"export: keys differ: {set(back) ^ set(ref)}")
  for k, v in ref.items():
    want = np.zeros_like(v) if convert.is_known_unused(k) else v
    if back[k].dtype != v.dtype or back[k].shape != v.shape or (
        not np.array_equal(back[k], want)):
      raise AssertionError(f"export: {k} as torch reads it differs")
  info["export_tensors"] = len(back)
  if verbose:
    print({k: (round(v, 3) if isinstance(v, float) else v)
           for k, v in info.items()})
  return errs


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--torch_python", default=None,
                      help="an interpreter with torch (default: this one)")
  parser.add_argument("--keep_export", default=None,
                      help="where to keep the exported .pth (step 4)")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as d:
    errs = roundtrip(d, args.torch_python, verbose=True,
                     keep_export=args.keep_export)
  print(errs)
  ok = (errs["pred"] <= 1e-4 and errs["mask_feature"] <= 1e-4
        and errs["vggish"] <= 1e-5)
  print("PASS" if ok else "FAIL")
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
