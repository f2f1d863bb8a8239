"""benchmarks/original/: what runs without torch (the timing itself needs
torch and a checkout of the original; benchmarks/README.md)."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "original", "time_original.py")


def _run(*args):
  return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True,
                        text=True, timeout=60)


def test_a_wrong_checkout_is_named_before_torch_is_needed(tmp_path):
  r = _run("--src", str(tmp_path), "--backbone", "res50", "--mode", "eval")
  assert r.returncode != 0
  assert f"--src {tmp_path}: not a checkout of vvvb-github/AVSegFormer" \
      in r.stderr, r.stderr
  assert "Traceback" not in r.stderr


def test_a_wrong_reference_folder_is_named(tmp_path):
  src = tmp_path / "orig"
  (src / "config" / "s4").mkdir(parents=True)
  (src / "config" / "s4" / "AVSegFormer_res50_s4.py").write_text("model = {}\n")
  r = _run("--src", str(src), "--reference", str(tmp_path), "--backbone",
           "pvt2", "--mode", "parity")
  assert r.returncode != 0 and "no synth_weights.py" in r.stderr, r.stderr

