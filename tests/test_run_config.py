"""run_config: the config kept beside a checkpoint, what differs from it,
and `configs/run.py`, which takes it back."""
import json
import os
import subprocess
import sys

import pytest

from avsegformer_jax import run_config
from configs import default, run, tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_changes_against_the_workdirs_run(tmp_path):
  """What a resume logs and a mismatch names: the fields that differ from
  the run's WORKDIR/config.json, found from the workdir or a step of it."""
  run = tiny.get_config("pvt2")
  run_config.save(run, tmp_path)
  now = tiny.get_config("res50")
  now.train.learning_rate = 1e-3
  want = [("model.backbone", "pvt2", "res50"),
          ("train.learning_rate", 2e-5, 1e-3)]
  assert run_config.changes(now, tmp_path) == want
  assert run_config.changes(now, tmp_path / "checkpoints" / "12") == want
  assert run_config.changes(now, tmp_path / "config.json") == want
  assert run_config.changes(run, tmp_path / "best" / "3") == []
  assert run_config.changes(now, tmp_path / "elsewhere") == []
  assert run_config.model_changes(want) == (
      "Its run had model.backbone=pvt2 (this config: res50). ")
  # Not what makes variables differ: how the model computes.
  assert run_config.model_changes([("model.scan_layers", False, True),
                                   ("model.dtype", "float32", "bfloat16")]) == ""
  (tmp_path / "config.json").write_text("{cut sh")
  assert run_config.changes(now, tmp_path) == []
  (tmp_path / "config.json").write_text("[1, 2]")       # JSON, not ours
  assert run_config.changes(now, tmp_path) == []


def test_output_changes_are_the_fields_that_change_the_masks(tmp_path):
  """A model run at another resolution, window or task, or with a model
  field that fits the variables all the same (8 heads or 4 split the same
  weights), gives other masks without an error: those are named. How it
  computes (dtype, remat, ...) and how it was trained are not."""
  run = tiny.get_config("pvt2")
  run_config.save(run, tmp_path)
  now = tiny.get_config("pvt2")
  now.task, now.data.image_size, now.data.num_frames = "ms3", 96, 3
  now.model.num_heads = 4
  now.model.dtype, now.model.remat = "bfloat16", True
  now.train.batch_size, now.eval.batch_size = 8, 8
  now.data.data_dir = "/elsewhere"
  diff = run_config.output_changes(now, tmp_path / "best" / "4")
  assert diff == [("data.image_size", 64, 96), ("data.num_frames", 2, 3),
                  ("model.num_heads", 8, 4), ("task", "s4", "ms3")]
  note = run_config.output_changes_note("/runs/a", diff)
  assert note.startswith(
      "/runs/a was made with data.image_size=64, data.num_frames=2, "
      "model.num_heads=8, task=s4; this config has data.image_size=96, "
      "data.num_frames=3, model.num_heads=4, task=ms3.")
  assert note.endswith("--config=configs/run.py:/runs/a takes that run's "
                       "config")
  assert run_config.output_changes(run, tmp_path) == []
  # A run of an earlier version, before a model field existed: not compared.
  saved = json.loads((tmp_path / "config.json").read_text())
  del saved["model"]["learnable_queries"]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert run_config.changes(run, tmp_path) == [
      ("model.learnable_queries", "unset", True)]
  assert run_config.output_changes(run, tmp_path) == []


def test_configs_run_takes_the_runs_config_back(tmp_path, capsys):
  """`--config=configs/run.py:PATH` is the run's config, overrides and
  placeholders included, from the workdir, a step, an export or the file;
  overrides on the command line apply on top of it."""
  made = tiny.get_config("res50")
  made.task, made.data.image_size, made.train.learning_rate = "ms3", 48, 3e-4
  made.model.attention_dropout = 0.0
  run_config.save(made, tmp_path)
  for where in (tmp_path, tmp_path / "checkpoints" / "7",
                tmp_path / "config.json"):
    got = run.get_config(str(where))
    assert got.to_json_best_effort(sort_keys=True) == \
        made.to_json_best_effort(sort_keys=True)
  # An unset placeholder stays unset, and takes a value of its type.
  plain = tiny.get_config("pvt2")
  (tmp_path / "plain").mkdir()
  run_config.save(plain, tmp_path / "plain")
  got, dropped = run_config.load(tmp_path / "plain", default.get_config())
  assert got.model.attention_dropout is None and dropped == []
  got.model.attention_dropout = 0.1
  # A field this version lacks is left out and named, not fatal.
  saved = json.loads((tmp_path / "config.json").read_text())
  saved["model"]["retired_option"] = 3
  (tmp_path / "config.json").write_text(json.dumps(saved))
  got, dropped = run_config.load(tmp_path, default.get_config())
  assert dropped == ["model.retired_option"] and got.data.image_size == 48
  assert capsys.readouterr().err == (
      f"{tmp_path}/config.json: fields this version does not have, left "
      "out: model.retired_option\n")


@pytest.mark.parametrize("content,error", [
    (None, r"config.json: no such file \(a training workdir, one of its "
           r"steps or a model export keeps its config there\)"),
    ("{cut sh", r"config.json: not a config written by avsegformer-jax"),
    ('{"data": {"image_size": "big"}}',
     r"config.json: data.image_size='big' does not fit the field")])
def test_configs_run_names_what_it_cannot_use(tmp_path, content, error):
  if content is not None:
    (tmp_path / "config.json").write_text(content)
  with pytest.raises(OSError, match=error):
    run_config.load(tmp_path, default.get_config())


def test_the_cli_flag(tmp_path):
  """Through a CLI's --config flag, with an override on top; a workdir
  without a config.json is a one-line flag error."""
  made = tiny.get_config("pvt2")
  made.model.num_queries = 4
  run_config.save(made, tmp_path)
  counts = {}
  for args in ([f"--config=configs/run.py:{tmp_path}"],
               [f"--config=configs/run.py:{tmp_path}",
                "--config.model.num_queries=8"],
               ["--config=configs/tiny.py", "--config.model.num_queries=4"]):
    r = subprocess.run([sys.executable, "-m", "avsegformer_jax.param_count",
                        *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    counts[len(args), args[0]] = r.stdout.splitlines()[-1]
  assert len(set(counts.values())) == 2     # 4 queries twice, 8 once
  assert counts[1, f"--config=configs/run.py:{tmp_path}"] == \
      counts[2, "--config=configs/tiny.py"]
  r = subprocess.run(
      [sys.executable, "main.py", f"--config=configs/run.py:{tmp_path}/x",
       f"--workdir={tmp_path}/w"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.splitlines()[0].startswith(
      f"FATAL Flags parsing error: flag --config=configs/run.py:{tmp_path}/x"
      f": cannot load this config file ({tmp_path}/x/config.json: no such "
      "file")
