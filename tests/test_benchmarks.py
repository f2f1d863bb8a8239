"""The benchmark command runs end to end (tiny config, one step, in-process)
and writes every field the table promises, with sane values."""
import json

import numpy as np

from benchmarks import model as bench_model

PHASE_FIELDS = {
    "eval": ("eval_compile_s", "eval_step_s", "eval_frames_per_s",
             "peak_bytes_after_eval"),
    "frozen": ("train_frozen_compile_s", "train_frozen_step_s",
               "train_frozen_clips_per_s", "peak_bytes_after_frozen"),
    "unfrozen": ("train_unfrozen_compile_s", "train_unfrozen_step_s",
                 "train_unfrozen_clips_per_s", "peak_bytes_after_unfrozen"),
}


def test_quick_benchmark_writes_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  # eval + frozen only: each train-step compile of even the tiny model costs
  # tens of seconds on 2 cores (the unfrozen step is the same code path).
  bench_model.main(["--quick", "--steps", "1", "--warmup", "0",
                    "--phases", "eval,frozen",
                    "--dtypes", "float32", "--json", str(out)])
  printed = capsys.readouterr().out
  assert "tiny_pvt2" in printed and "clips/s" in printed
  result = json.loads(out.read_text())
  assert result["device"]["platform"] in ("cpu", "gpu", "tpu")
  assert result["device"]["device_kind"]
  (row,) = result["rows"]
  assert "error" not in row, row["error"]
  assert row["config"] == "tiny_pvt2" and row["dtype"] == "float32"
  for phase in ("eval", "frozen"):
    for f in PHASE_FIELDS[phase]:
      assert isinstance(row[f], (int, float)) and row[f] > 0, (f, row.get(f))
  # Throughput is the inverse of the step time, in clips (train) / frames.
  assert "train_unfrozen_step_s" not in row          # phase not asked for
  np.testing.assert_allclose(
      row["train_frozen_clips_per_s"] * row["train_frozen_step_s"], 1.0)
  np.testing.assert_allclose(
      row["eval_frames_per_s"] * row["eval_step_s"],
      row["eval_batch_clips"] * row["frames_per_clip"])
  assert np.isfinite(row["train_frozen_loss"])
  assert row["memory_kind"] in ("host_peak_rss", "device_peak_bytes_in_use")
  assert row["peak_bytes"] >= row["peak_bytes_after_eval"] > 2**20


def test_unknown_config_is_named(capsys):
  import pytest
  with pytest.raises(SystemExit):
    bench_model.parse_args(["--configs", "s4_vit_224"])
  assert "s4_vit_224" in capsys.readouterr().err
