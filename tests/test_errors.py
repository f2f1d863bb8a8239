"""errors.py: the errors whose message is the whole report, and that the
CLIs end on them with one line and status 2 instead of a traceback."""
import os
import subprocess
import sys

import pytest

from avsegformer_jax import (audio, checkpoint, convert, errors, predict,
                             torch_io, trainer, video_io)
from datasets import input_pipeline
from datasets.avsbench import raw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("cls", [
    audio.AudioError, checkpoint.CheckpointError, convert.ConversionError,
    predict.PredictError, torch_io.TorchFileError, video_io.VideoError,
    input_pipeline.PipelineError, raw.AVSBenchError])
def test_input_errors_are_reported_value_errors(cls):
  assert issubclass(cls, errors.InputError)
  assert issubclass(cls, ValueError)        # callers catching ValueError


def test_a_diverged_run_is_reported_too():
  assert issubclass(trainer.NonFiniteLossError, errors.ReportedError)
  assert issubclass(trainer.NonFiniteLossError, RuntimeError)


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


def test_main_without_a_prepared_dataset(tmp_path):
  data = tmp_path / "tfds"
  r = _run("main.py", "--config=configs/tiny.py", f"--workdir={tmp_path}/w",
           f"--config.data.data_dir={data}")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("main.py: error: cannot open avsbench/s4 split 'train'")
  # It says how to prepare it, with this data_dir.
  assert (f"python -m datasets.avsbench.prepare --config=s4 "
          f"--manual_dir=RAW_AVSBENCH --data_dir={data}") in last


def test_main_eval_of_a_missing_checkpoint_stops_before_any_work(tmp_path):
  r = _run("main.py", "--config=configs/demo.py", f"--workdir={tmp_path}/w",
           "--mode=eval", f"--checkpoint={tmp_path}/missing")
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f"main.py: error: {tmp_path}/missing: no such checkpoint")
  assert not (tmp_path / "w").exists()      # the demo's data not written


def test_main_without_config_takes_the_runs_own(tmp_path):
  """No --config: a resume takes the workdir's run config, an eval that of
  --checkpoint (or the workdir); where there is none, one line says so."""
  from avsegformer_jax import run_config  # pylint: disable=g-import-not-at-top
  from configs import tiny  # pylint: disable=g-import-not-at-top
  w = tmp_path / "w"
  r = _run("main.py", f"--workdir={w}")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f"main.py: error: no --config given, and {w}/config.json: no such "
      "file (a training workdir, one of its steps or a model export keeps "
      "its config there); give one, e.g. --config=configs/s4.py:pvt2")
  w.mkdir()
  run_config.save(tiny.get_config(), w)
  r = _run("main.py", f"--workdir={w}", "--mode=eval")
  assert r.stdout.startswith(f"config: {w}/config.json\n"), r.stdout
  assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(
      f"main.py: error: {w}: neither a model export"), r.stderr[-3000:]


@pytest.mark.parametrize("prog", [["main.py"], ["-m", "avsegformer_jax.predict"],
                                  ["-m", "avsegformer_jax.convert"]])
def test_an_override_without_config_is_named(tmp_path, prog):
  """The CLIs may leave --config out (the checkpoint's own is taken), but an
  override then has nothing to override: absl said "Unknown command line
  flag 'config.model.dtype'"."""
  r = _run(*prog, f"--workdir={tmp_path}", f"--checkpoint={tmp_path}",
           f"--video={tmp_path}/v.mp4", f"--out={tmp_path}/o",
           "--config.model.dtype=bfloat16")
  assert r.returncode == 1, r.stderr[-3000:]
  assert r.stderr.splitlines()[0] == (
      "FATAL Flags parsing error: --config.model.dtype overrides a field of "
      "--config, which is not given: give it too, e.g. "
      "--config=configs/run.py:PATH (the config of the workdir or checkpoint "
      "at PATH)")


def test_prepare_without_the_download(tmp_path):
  (tmp_path / "raw").mkdir()
  r = _run("-m", "datasets.avsbench.prepare", "--config=ms3",
           f"--manual_dir={tmp_path}/raw", f"--data_dir={tmp_path}/tfds")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith(f"prepare: error: {tmp_path}/raw: manual dir does "
                         "not exist or is empty. AVSBench is form-gated")


@pytest.mark.parametrize("prog,args", [
    (["main.py"], ["--workdir=/nonexistent/w"]),
    (["main.py"], ["--workdir=/nonexistent/w", "--config.train.batch_size=4"]),
    (["-m", "avsegformer_jax.predict"],
     ["--checkpoint=x", "--video=x", "--out=/nonexistent/p"]),
    (["-m", "avsegformer_jax.convert"],
     ["--checkpoint=x", "--out=/nonexistent/o"]),
    (["-m", "avsegformer_jax.param_count"], [])],
    ids=["main", "main_override", "predict", "convert", "param_count"])
def test_an_unreadable_config_file_is_named_at_flag_parsing(tmp_path, prog,
                                                            args):
  """ml_collections defers an unreadable config file's error to its first
  use (an override flag's parsing, or the CLI's), where it surfaced as a
  traceback from inside the library; each CLI stops on it before any work."""
  missing = tmp_path / "configs" / "s4_typo.py"
  r = _run(*prog, f"--config={missing}:pvt2", *args)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.splitlines()[0] == (
      f"FATAL Flags parsing error: flag --config={missing}:pvt2: cannot load "
      f"this config file ([Errno 2] No such file or directory: '{missing}'); "
      "give one such as configs/s4.py:pvt2")


@pytest.mark.parametrize("override,error", [
    ("--config.trian.batch_size=3",
     "--config.trian.batch_size: the config has no field 'trian'; did you "
     "mean train?"),
    ("--config.model.rematt=True",
     "--config.model.rematt: model has no field 'rematt'; did you mean remat?"),
    ("--noconfig.data.xyz",
     "--config.data.xyz: data has no field 'xyz'; it has "),
    ("--config.train.batch_size.x=3",
     "--config.train.batch_size.x: train.batch_size is a value, not a group")])
def test_an_override_of_a_missing_field_is_named(override, error):
  r = _run("main.py", "--config=configs/demo.py", "--workdir=/nonexistent/w",
           "--config.train.batch_size=4", override)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.splitlines()[0].startswith(
      f"FATAL Flags parsing error: flag --config=configs/demo.py: {error}")


@pytest.mark.parametrize("prog,args,what", [
    (["main.py", "--config=configs/tiny.py"], ["--workdir={out}"],
     "the workdir"),
    (["-m", "avsegformer_jax.predict", "--config=configs/tiny.py"],
     ["--checkpoint={tmp}", "--video={tmp}/v.mp4", "--out={out}"],
     "the output directory"),
    (["-m", "datasets.avsbench.synthesize"],
     ["--task=s4", "--out={out}"], "the output folder"),
    (["-m", "datasets.avsbench.prepare"],
     ["--config=s4", "--manual_dir={tmp}", "--data_dir={out}"], "the data dir"),
], ids=["main.py", "predict", "synthesize", "prepare"])
def test_an_output_folder_that_cannot_be_made_is_named(request, tmp_path,
                                                        prog, args, what):
  (tmp_path / "v.mp4").write_bytes(b"not read: the output folder comes first")
  out = tmp_path / "v.mp4" / "out"               # under a file: ENOTDIR
  r = _run(*prog, *(a.format(tmp=tmp_path, out=out) for a in args))
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      f"{request.node.callspec.id}: error: {out}: cannot create {what} "
      f"([Errno 20] Not a directory: '{out}')")


@pytest.mark.parametrize("field,value,error", [
    ("train.batch_size", 0, "train.batch_size must be at least 1, got 0"),
    ("eval.batch_size", 0, "eval.batch_size must be at least 1, got 0"),
    ("train.num_epochs", 0, "train.num_epochs must be at least 1, got 0"),
    ("train.log_every_steps", 0, "train.log_every_steps must be at least 1"),
    ("checkpoint.every_steps", 0, "checkpoint.every_steps must be at least 1"),
    ("checkpoint.keep", 0, "checkpoint.keep must be at least 1, got 0"),
    ("train.learning_rate", -1e-4, "train.learning_rate must be > 0"),
    ("train.adam_eps", 0.0, "train.adam_eps must be > 0, got 0.0"),
    ("train.weight_decay", -0.01, "train.weight_decay must be at least 0"),
    ("train.mix_loss_weight", -0.1, "train.mix_loss_weight must be at least 0"),
    ("train.batch_size", 3, "train.batch_size=3 does not split evenly over "
     "the 2 devices: give a multiple of 2"),
    ("train.loss", "iou", "train.loss must be one of ('dice', 'bce', 'ce')"),
    # AVSS's multi-class loss on S4's one logit: NaN, "diverged".
    ("train.loss", "ce", "train.loss must be 'dice' or 'bce' for task 's4', "
     "got 'ce' (configs/s4.py sets it)"),
    ("train.prng_impl", "philox", "train.prng_impl must be one of"),
    # MS3's labels of frames 1-4 were never loaded (a PVTv2 run loads frame
    # 0 alone then).
    ("task", "ms3", "train.first_frame_only is for S4 (its training clips "
     "label frame 0 only); task 'ms3' labels every frame: set --config.train."
     "first_frame_only=False (configs/ms3.py does)")])
def test_a_run_setting_that_cannot_work_is_named(field, value, error,
                                                 monkeypatch):
  """A batch of 0 divided by zero in the pipeline and a negative learning
  rate trained uphill without a word; the loss and bit generator were met
  inside the traced step, a batch the devices do not share evenly in JAX's
  sharding (here as if on 2 devices)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "device_count", lambda: 2)
  config = tiny.get_config()
  trainer.check_config(config, training=True)
  config.update_from_flattened_dict({field: value})
  with pytest.raises(errors.ConfigError) as e:
    trainer.check_config(config, training=True)
  assert str(e.value).startswith(error), e.value
  if not field.startswith(("eval.", "model.", "data.")):  # eval: no matter
    trainer.check_config(config, training=False)


def test_main_checks_the_config_before_the_demo_writes_data(tmp_path):
  r = _run("main.py", "--config=configs/demo.py", f"--workdir={tmp_path}/w",
           "--config.data.image_size=70")
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "main.py: error: data.image_size must be a multiple of 4 and at least "
      "32, got 70")
  assert not (tmp_path / "w" / "synthetic_raw").exists()


def test_a_full_disk_is_named_whichever_write_met_it(tmp_path, monkeypatch,
                                                     capsys):
  """main.py, prepare and synthesize report a failed write on a full disk
  in one line (by hand, on tmpfs: libsndfile's "System error.", array_
  record's RuntimeError); with room left the error is re-raised as it is."""
  from avsegformer_jax import files  # pylint: disable=g-import-not-at-top
  err = RuntimeError("System error.")
  monkeypatch.setattr(files, "disk_full", lambda p: None)
  assert errors.exit_if_disk_full("prepare", tmp_path, err, "retry") is None
  monkeypatch.setattr(files, "disk_full", lambda p: "0.2 MiB free")
  with pytest.raises(SystemExit) as e:
    errors.exit_if_disk_full("prepare", tmp_path, err, "prepare again")
  assert e.value.code == 2
  assert capsys.readouterr().err == (
      f"prepare: error: {tmp_path}: the disk is full (0.2 MiB free; the write "
      "that failed: RuntimeError: System error.); free some space and "
      "prepare again\n")


def _oom():
  """XLA's own RESOURCE_EXHAUSTED: a 1 TiB buffer on this CPU."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  try:
    jax.jit(lambda: jnp.ones((2**38,), jnp.float32))().block_until_ready()
  except RuntimeError as e:
    return e
  raise AssertionError("a 1 TiB buffer was allocated")


def test_out_of_memory_says_what_to_change():
  """A device out of memory (AVSS at batch 4 needs ~34 GiB without remat)
  was a traceback through jit's internals ending in XLA's status line."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  e = errors.out_of_memory(_oom(), "try less")
  assert isinstance(e, errors.ReportedError)
  assert str(e) == ("out of memory (RESOURCE_EXHAUSTED: Out of memory "
                    "allocating 1099511627776 bytes.); try less")
  assert errors.out_of_memory(RuntimeError("INTERNAL: other"), "x") is None
  assert errors.out_of_memory(ValueError("RESOURCE_EXHAUSTED"), "x") is None
  c = tiny.get_config()
  n = jax.device_count()
  c.train.batch_size, c.eval.batch_size = 2 * n, 2
  plan = ("`python -m benchmarks.plan` prints a setting's memory plan "
          "without running it (README: Speed)")
  assert trainer.memory_advice(c, training=True) == (
      f"try a smaller --config.train.batch_size (now {2 * n}, a multiple of "
      f"the {n} devices; --config.train.grad_accum_steps=K keeps K times "
      "that many clips per update), --config.model.remat=True, "
      f"--config.model.dtype=bfloat16; {plan}")
  assert trainer.memory_advice(c, training=False) == (
      "try a smaller --config.eval.batch_size (now 2), "
      f"--config.model.dtype=bfloat16; {plan}")
  # What is at its lightest already is not offered.
  c.train.batch_size, c.model.remat, c.model.dtype = n, True, "bfloat16"
  assert trainer.memory_advice(c, training=True) == plan
  assert predict._memory_advice(c, 1) == (  # pylint: disable=protected-access
      "the model does not fit this device at this data.image_size")
  assert predict._memory_advice(None, 4) == (  # pylint: disable=protected-access
      "try a smaller --batch_clips (now 4)")


_OOM_IN = """
import runpy, sys
import jax, jax.numpy as jnp
from avsegformer_jax import {module}
def oom(*args, **kwargs):
  jax.jit(lambda: jnp.ones((2**38,), jnp.float32))().block_until_ready()
{module}.{function} = oom
sys.argv[0] = "{prog}"
"""


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_main_out_of_memory_is_one_line(tmp_path, mode):
  script = _OOM_IN.format(
      module="trainer", prog="main.py", function="train_and_evaluate"
      if mode == "train" else "evaluate_checkpoint") + (
          "runpy.run_path('main.py', run_name='__main__')")
  r = _run("-c", script, "--config=configs/tiny.py", f"--mode={mode}",
           f"--workdir={tmp_path}/w", f"--checkpoint={tmp_path}")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  field = "train.batch_size" if mode == "train" else "eval.batch_size"
  assert r.stderr.strip().splitlines()[-1].startswith(
      "main.py: error: out of memory (RESOURCE_EXHAUSTED: Out of memory "
      f"allocating 1099511627776 bytes.); try a smaller --config.{field} "
      "(now 2"), r.stderr[-3000:]


def test_predict_out_of_memory_is_one_line(tmp_path):
  script = _OOM_IN.format(module="predict", prog="predict",
                          function="predict_videos") + (
      "from absl import app\n"
      "predict._define_flags()\n"
      "app.run(predict.main, flags_parser=predict.errors.parse_flags)")
  r = _run("-c", script, "--config=configs/demo.py", f"--checkpoint={tmp_path}",
           f"--video={tmp_path}/v.mp4", f"--out={tmp_path}/o",
           "--batch_clips=3")
  assert r.returncode == 2, r.stderr[-3000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1] == (
      "predict: error: out of memory (RESOURCE_EXHAUSTED: Out of memory "
      "allocating 1099511627776 bytes.); try a smaller --batch_clips (now 3) "
      "or --config.model.dtype=bfloat16")


@pytest.mark.parametrize("signum", [15, 2])
def test_main_reports_a_stop_on_a_signal_with_its_status(signum):
  """SIGTERM (a preemption notice) and a first Ctrl-C in the training loop
  both save the step reached: 143 / 130, one line each."""
  r = _run("-c", "import main\n"
           "from avsegformer_jax import errors\n"
           f"def stopped(argv): raise errors.Preempted(7, '/runs/x', {signum})\n"
           "main._main = stopped\n"
           "main.main(['main.py'])")
  assert r.returncode == 128 + signum, r.stderr
  why = "Ctrl-C (SIGINT)" if signum == 2 else "SIGTERM (preemption)"
  assert r.stderr == (f"main.py: stopped at step 7 on {why} after saving its "
                      "checkpoint in /runs/x; run the same command to "
                      "resume\n")
  assert (errors.PREEMPTED_STATUS, errors.INTERRUPTED_STATUS) == (143, 130)
  assert not issubclass(errors.Preempted, errors.ReportedError)  # no error


@pytest.mark.parametrize("prog", ["main", "predict"])
def test_a_ctrl_c_elsewhere_is_one_line_and_status_130(prog):
  """A second Ctrl-C, or one outside the training loop (compiling, writing
  the demo's data, predict): before, a traceback of wherever it fell."""
  if prog == "main":
    script = ("import main\n"
              "def interrupted(argv): raise KeyboardInterrupt\n"
              "main._main = interrupted\n"
              "main.main(['main.py'])")
  else:
    script = ("import sys\n"
              "from absl import flags\n"
              "from avsegformer_jax import predict\n"
              "predict._define_flags()\n"
              "flags.FLAGS(['predict', '--checkpoint=c', '--video=v', "
              "'--out=/runs/o', '--config=configs/demo.py'])\n"
              "def interrupted(*a, **k): raise KeyboardInterrupt\n"
              "predict.predict_videos = interrupted\n"
              "predict.main(['predict'])")
  r = _run("-c", script)
  assert r.returncode == 130, r.stderr
  assert "Traceback" not in r.stderr
  then = ("a training run resumes from its last checkpoint with the same "
          "command" if prog == "main" else "the videos finished are in "
          "/runs/o; --skip_done goes on from there")
  assert r.stderr.strip().splitlines()[-1] == (
      f"{'main.py' if prog == 'main' else 'predict'}: interrupted (Ctrl-C); "
      f"{then}")
