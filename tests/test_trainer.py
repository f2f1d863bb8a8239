"""The training loop end to end, in subprocesses (tiny model, in-memory data):
1 device vs 4 devices, and vs 2 JAX processes of 2 devices each, give the
same losses, metrics and parameters; a run killed with SIGKILL mid-epoch
resumes to the same final parameters, and one sent SIGTERM (a preemption
notice; to one process of two) or Ctrl-C saves the step it reached first."""
import fcntl
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

DRIVER = os.path.join(os.path.dirname(__file__), "train_driver.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cmd(workdir, out, devices=1):
  return [sys.executable, DRIVER, str(workdir), str(out), "--devices",
          str(devices)]


def _run(workdir, out, devices=1, *args):
  r = subprocess.run(_cmd(workdir, out, devices) + list(args), cwd=ROOT,
                     capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  # No progress bar into a pipe (a batch job's log): lines instead.
  assert "\r" not in r.stderr + r.stdout, r.stderr[-3000:]
  return dict(np.load(out)), r.stdout


def _losses(workdir, key="loss"):
  with open(os.path.join(workdir, "train_metrics.jsonl")) as f:
    rows = [json.loads(l) for l in f]
  return {r["step"]: r[key] for r in rows}


def _assert_same_params(a, b, atol):
  keys = [k for k in a if k not in ("miou", "fscore", "miou_dataset")
          and not k.startswith("eval_")]
  assert keys and sorted(keys) == sorted(k for k in b if k in keys)
  for k in keys:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """The uninterrupted 1-device run the others are compared with: made once
  per pytest run, by the first xdist worker that needs it while the others
  wait (each used to train its own, ~40 s on 2 cores). Read only."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent                  # the run's folder, above the workers'
  d = root / "one_device"
  with open(root / "one_device.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (d / "out.npz").exists():    # (a run that failed is done again)
      shutil.rmtree(d, ignore_errors=True)
      d.mkdir()
      _run(d / "wd", d / "out.npz")
  return d, dict(np.load(d / "out.npz"))


def test_one_vs_four_devices(reference_run, tmp_path):
  d1, one = reference_run
  four, out = _run(tmp_path / "wd", tmp_path / "out.npz", 4, "--line_s", "0")
  l1, l4 = _losses(d1 / "wd"), _losses(tmp_path / "wd")
  lines = [l for l in out.splitlines() if l.startswith("step ")]
  assert [l.split(":")[0] for l in lines] == [f"step {s}/6" for s in l4]
  assert lines[0].startswith(f"step 1/6: loss {l4[1]:.4f}, "), lines
  assert re.fullmatch(r"step 6/6: loss [\d.]+, [\d.]+ clips/s, input wait "
                      r"\d+%, about 0 min to go", lines[-1]), lines
  assert [l for l in out.splitlines() if l.startswith("eval ")] == [
      "eval validation: batch 1/2", "eval validation: batch 2/2"] * 2
  assert sorted(l1) == sorted(l4) and len(l1) == 6   # 3 steps x 2 epochs
  np.testing.assert_allclose([l4[s] for s in sorted(l4)],
                             [l1[s] for s in sorted(l1)], rtol=2e-5)
  # Gradients are not smooth everywhere (ReLU, the floor in bilinear
  # sampling): parameters one round-off apart can sit on either side of a
  # kink, which moved one step's norm by 3e-4 (relative) when the frames
  # started to be normalised by XLA instead of numpy, and the last step's by
  # 2.1e-3 on Python 3.13 with jax 0.12. A shard counted twice or missed
  # moves it by tens of percent.
  g1, g4 = _losses(d1 / "wd", "grad_norm"), _losses(tmp_path / "wd", "grad_norm")
  np.testing.assert_allclose([g4[s] for s in sorted(g4)],
                             [g1[s] for s in sorted(g1)], rtol=1e-2)
  # Metrics threshold the logits: parameters that differ by float32 round-off
  # (~2e-7 here) could flip a pixel sitting at 0, which moves the mIoU by
  # ~1e-4; a shard counted twice or missed moves it by far more.
  for k in ("miou", "fscore", "miou_dataset"):
    np.testing.assert_allclose(four[k], one[k], atol=2e-4, err_msg=k)
  # The share of each log interval spent waiting for the input pipeline.
  wait = _losses(d1 / "wd", "input_wait_fraction")
  assert sorted(wait) == sorted(l1) and all(0 <= w <= 1 for w in wait.values())
  # Summation order differs across devices: float32 round-off only.
  _assert_same_params(one, four, atol=2e-5)


def test_sigkill_and_resume(reference_run, tmp_path):
  _, full = reference_run
  wd, out = tmp_path / "wd", tmp_path / "out.npz"
  proc = subprocess.Popen(_cmd(wd, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  # Kill after the checkpoint of step 4 (mid epoch 2, backbone unfrozen).
  target = wd / "checkpoints" / "4"
  deadline = time.time() + 1800
  while not target.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  assert target.exists(), "no checkpoint at step 4 before the run ended"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not out.exists()
  resumed, _ = _run(wd, out)
  _assert_same_params(full, resumed, atol=0)
  np.testing.assert_allclose(resumed["miou"], full["miou"], atol=0)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_cluster(wd, out, logdir, *extra):
  """2 driver processes x 2 CPU devices, one JAX cluster on localhost."""
  coord = f"localhost:{_free_port()}"
  procs = []
  for i in range(2):
    # To a file: a pipe nobody reads could fill up and block the process.
    with open(logdir / f"process_{i}.log", "w") as log:
      procs.append(subprocess.Popen(
          _cmd(wd, out, devices=2) + [
              "--processes", "2", "--process_id", str(i),
              "--coordinator", coord, *extra],
          cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log))
  return procs


def _wait_cluster(procs, logdir, expect=0):
  """Waits for every process; asserts each exited with `expect` (or with
  `expect[i]`, one status per process)."""
  expect = list(expect) if isinstance(expect, (list, tuple)) else \
      [expect] * len(procs)
  deadline = time.time() + 1800
  # One failed process leaves the other waiting in a collective: stop both.
  while any(p.poll() is None for p in procs) and time.time() < deadline:
    if any(p.poll() not in (None, e) for p, e in zip(procs, expect)):
      break
    time.sleep(0.5)
  errs = []
  for i, p in enumerate(procs):
    if p.poll() is None:
      p.kill()
    p.wait()
    err = (logdir / f"process_{i}.log").read_text()
    errs.append(err[err.find("Traceback"):][-3000:] if "Traceback" in err
                else err[-3000:])
  for i, p in enumerate(procs):
    assert p.returncode == expect[i], f"process {i}: {errs[i]}"
  return errs


def _steps(wd, sub="checkpoints"):
  return sorted(int(x) for x in os.listdir(wd / sub) if x.isdigit())


def _wait_for_log_line(wd, procs, timeout=1800):
  """Until the run has logged a step (its loop, and SIGTERM handling, run)."""
  log, deadline = wd / "train_metrics.jsonl", time.time() + timeout
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if log.exists() and log.read_text().strip():
      return
    time.sleep(0.1)
  raise AssertionError("the run ended or timed out before logging a step")


def test_two_processes(reference_run, tmp_path):
  """`jax.distributed` on one machine: 2 processes x 2 CPU devices, each
  feeding its half of every global batch, train, checkpoint (orbax, grain's
  per-process iterator state) and evaluate with visualisations as one run.
  Then a Ctrl-C reaches one of them in a second run: passed to JAX's
  preemption service as the SIGTERM a preemption sends, it makes both save
  the same step and stop (before, that process alone died, with no
  checkpoint since its epoch's, and left the other waiting in a
  collective); restarted, they finish with the first run's parameters
  exactly. (One test: under pytest-xdist a module
  fixture for the first run would be made once per worker.)"""
  d1, one = reference_run
  wd, out = tmp_path / "wd", tmp_path / "out.npz"
  _wait_cluster(_start_cluster(wd, out, tmp_path, "--visualize", "3"),
                tmp_path)
  two = dict(np.load(out))
  l1, l2 = _losses(d1 / "wd"), _losses(wd)
  assert sorted(l1) == sorted(l2) and len(l1) == 6
  np.testing.assert_allclose([l2[s] for s in sorted(l2)],
                             [l1[s] for s in sorted(l1)], rtol=2e-5)
  g1, g2 = _losses(d1 / "wd", "grad_norm"), _losses(wd, "grad_norm")
  np.testing.assert_allclose([g2[s] for s in sorted(g2)],
                             [g1[s] for s in sorted(g1)], rtol=2e-3)
  for k in ("miou", "fscore", "miou_dataset"):
    np.testing.assert_allclose(two[k], one[k], atol=2e-4, err_msg=k)
  _assert_same_params(one, two, atol=2e-5)
  # The best checkpoint, scored again in its own program: its recorded mIoU;
  # the split's first 3 clips drawn by the processes that held them (clip2
  # by process 1: eval batches of 4 clips, 2 per process).
  with open(glob.glob(str(wd / "best" / "*" / "meta" / "metadata"))[0]) as f:
    best = json.load(f)["miou"]
  np.testing.assert_allclose(two["eval_miou"], best, atol=2e-4)
  clips = sorted(os.listdir(wd / "visualizations" / "validation"))
  assert clips == ["clip0", "clip1", "clip2"], clips
  # Each clip's scores, gathered from both processes (clip2 and clip3 were
  # process 1's), in the split's order; weighted by their frames, the
  # split's frame-level mIoU.
  with open(wd / "eval_clips_validation.jsonl") as f:
    recs = [json.loads(line) for line in f]
  assert [r["clip_id"] for r in recs] == [f"clip{i}" for i in range(6)]
  frames = np.array([r["frames"] for r in recs])
  np.testing.assert_allclose(
      np.sum(np.array([r["miou"] for r in recs]) * frames) / frames.sum(),
      two["eval_miou_dataset"], rtol=1e-5)

  d2 = tmp_path / "sigterm"
  d2.mkdir()
  wd, out = d2 / "wd", d2 / "out.npz"
  procs = _start_cluster(wd, out, d2, "--every_steps", "1000")
  _wait_for_log_line(wd, procs)
  procs[1].send_signal(signal.SIGINT)
  errs = _wait_cluster(procs, d2, expect=(143, 130))
  logged = max(_losses(wd))
  assert _steps(wd)[-1] == logged and logged < 6, (_steps(wd), logged)
  assert f"stopped at step {logged} on SIGTERM" in errs[0], errs
  assert f"stopped at step {logged} on Ctrl-C" in errs[1], errs
  _wait_cluster(_start_cluster(wd, out, d2), d2)
  _assert_same_params(two, dict(np.load(out)), atol=0)


def test_sigterm_saves_the_step_and_resumes_elsewhere(reference_run, tmp_path):
  """A preemption notice (SIGTERM) mid-epoch: the step reached is saved, the
  process exits with 143 (checkpoints otherwise only at epoch ends here).
  The run then goes on as 2 processes x 2 devices with 1 input worker each
  and its layers scanned (it ran as 1 process, 1 device, no workers,
  unrolled layers) and ends where the uninterrupted run does, to the
  four-device test's round-off."""
  _, full = reference_run
  wd, out = tmp_path / "wd", tmp_path / "out.npz"
  with open(tmp_path / "log", "w") as log:
    proc = subprocess.Popen(_cmd(wd, out) + ["--every_steps", "1000"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
  _wait_for_log_line(wd, [proc])
  proc.send_signal(signal.SIGTERM)
  proc.wait(timeout=600)
  err = (tmp_path / "log").read_text()
  assert proc.returncode == 143, err[-3000:]
  logged = max(_losses(wd))
  assert _steps(wd) and _steps(wd)[-1] == logged and logged < 6, (
      _steps(wd), logged)
  assert f"stopped at step {logged} on SIGTERM" in err
  assert not out.exists()
  _wait_cluster(_start_cluster(wd, out, tmp_path, "--workers", "1", "--set",
                               "model.scan_layers=True"), tmp_path)
  resumed = dict(np.load(out))
  _assert_same_params(full, resumed, atol=2e-5)
  np.testing.assert_allclose(resumed["miou"], full["miou"], atol=2e-4)


@pytest.mark.parametrize("sig,status,name", [
    (signal.SIGINT, 130, "Ctrl-C (SIGINT)"),
    (signal.SIGHUP, 129, "SIGHUP (its terminal closed)")])
def test_ctrl_c_saves_the_step_and_stops_quietly(tmp_path, sig, status, name):
  """A terminal's Ctrl-C, or its hangup (a closed window, a dropped ssh
  session), reaches the whole process group: the trainer and its input
  workers. Before, the trainer lost the steps since its last checkpoint
  (here: all of them) and every process printed a traceback (Ctrl-C) or
  died (SIGHUP). Now the step reached is saved, with one line and status
  128 + the signal's number."""
  wd, out = tmp_path / "wd", tmp_path / "out.npz"
  with open(tmp_path / "log", "w") as log:
    proc = subprocess.Popen(
        _cmd(wd, out) + ["--every_steps", "1000", "--workers", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log,
        start_new_session=True)
  _wait_for_log_line(wd, [proc])
  os.killpg(proc.pid, sig)
  proc.wait(timeout=600)
  err = (tmp_path / "log").read_text()
  assert proc.returncode == status, err[-3000:]
  logged = max(_losses(wd))
  assert _steps(wd) == [logged] and logged < 6, (_steps(wd), logged)
  assert f"stopped at step {logged} on {name}" in err, err[-3000:]
  # (The driver's os._exit leaves multiprocessing's resource tracker
  # reporting leaks; main.py exits normally, and without them.)
  assert "Traceback" not in err, err[-3000:]
  assert "KeyboardInterrupt" not in err, err[-3000:]


def test_resume_refuses_another_batch_size_or_model(reference_run, tmp_path):
  """What a step means (batch_size, grad_accum_steps) and the model's
  variables must match the workdir's run; the error says which setting
  differs and what to do."""
  d1, _ = reference_run
  for change, expect in (
      ("train.batch_size=2", "its run trains 4 clips per step \\(train."
       "batch_size\\), this config 2: resume with --config.train.batch_size=4"),
      ("train.grad_accum_steps=2", "its run averages the gradients of 1 "
       "step\\(s\\) per update \\(train.grad_accum_steps\\), this config 2: "
       "resume with --config.train.grad_accum_steps=1"),
      ("model.num_encoder_layers=2", "checkpoints/6: does not fit the config: "
       "\\d+ missing \\(params/head/transformer/encoder/layers_1/.*Its run had "
       "model.num_encoder_layers=1 \\(this config: 2\\). Resume with the "
       "config it was trained with \\(--config=configs/run.py:.*\\), or "
       "start a new workdir from these weights: "
       "--config.pretrained.checkpoint=.*/checkpoints/6")):
    wd = tmp_path / change.split("=")[0]
    shutil.copytree(d1 / "wd", wd)
    r = subprocess.run(_cmd(wd, tmp_path / "out.npz") + ["--set", change],
                       cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 1 and re.search(expect, r.stderr), r.stderr[-3000:]


def test_rerunning_a_finished_run_changes_nothing(reference_run, tmp_path):
  """The same command after the last step: no step, the results kept (they
  were overwritten by {}), and the pretrained files, which a resume does not
  read, may be gone."""
  d1, full = reference_run
  wd = tmp_path / "wd"
  shutil.copytree(d1 / "wd", wd)
  before = (wd / "train_results.json").read_text()
  r = subprocess.run(
      _cmd(wd, tmp_path / "out.npz") + [
          "--set", "pretrained.backbone='/gone/pvt_v2_b0.pth'"],
      cwd=ROOT, capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (wd / "train_results.json").read_text() == before
  again = dict(np.load(tmp_path / "out.npz"))
  _assert_same_params(full, again, atol=0)
  assert again["miou"] == full["miou"]
  assert max(_losses(wd)) == 6 and len(_losses(wd)) == 6   # no step logged


def test_evaluations_keep_their_results_and_overlays_apart(tmp_path):
  """`--mode=eval --shuffle_audio` (and the demo's audio control, which runs
  both) writes its masks and overlays apart: before, the shuffled run
  overwrote the true-audio ones, which then showed another clip's sound.
  Each split keeps its own results file too."""
  sys.path.insert(0, os.path.dirname(__file__))
  import jax
  from avsegformer_jax import avsegformer, checkpoint, run_config, trainer
  from train_driver import synthetic_source, tiny_config
  config = tiny_config()
  config.eval.num_visualize = 2
  model = avsegformer.build_model(config)
  checkpoint.save_variables(tmp_path / "export", avsegformer.init_variables(
      model, jax.random.PRNGKey(0), 32))
  source = synthetic_source(4, 2, 32, 1)
  vis = tmp_path / "wd" / "visualizations"

  def files(d):
    return {os.path.relpath(p, d): os.stat(p).st_mtime_ns
            for p in glob.glob(str(d / "*" / "*.png"))}

  trainer.evaluate_checkpoint(config, str(tmp_path / "wd"),
                              str(tmp_path / "export"), "validation",
                              source=source)
  true = files(vis / "validation")
  assert sorted({k.split(os.sep)[0] for k in true}) == ["clip0", "clip1"]
  time.sleep(0.01)
  trainer.evaluate_checkpoint(config, str(tmp_path / "wd"),
                              str(tmp_path / "export"), "validation",
                              source=source, shuffle_audio=True)
  assert files(vis / "validation") == true           # not rewritten
  assert sorted(files(vis / "validation_shuffled_audio")) == sorted(true)
  # An export whose config differs in what changes the outputs: the eval
  # runs with this config's, and its results say what the export had.
  made = tiny_config()
  made.data.num_frames = 3
  run_config.save(made, tmp_path / "export")
  trainer.evaluate_checkpoint(config, str(tmp_path / "wd"),
                              str(tmp_path / "export"), "test",
                              source=source)
  assert sorted(os.listdir(tmp_path / "wd")) == [
      "eval_clips_test.jsonl", "eval_clips_validation.jsonl",
      "eval_clips_validation_shuffled_audio.jsonl",
      "eval_results_test.json", "eval_results_validation.json",
      "eval_results_validation_shuffled_audio.json", "visualizations"]
  assert sorted(os.listdir(vis)) == [
      "test", "validation", "validation_shuffled_audio"]
  with open(tmp_path / "wd" / "eval_results_validation.json") as f:
    res = json.load(f)
  assert res["split"] == "validation" and "checkpoint_made_with" not in res
  with open(tmp_path / "wd" / "eval_results_test.json") as f:
    assert json.load(f)["checkpoint_made_with"] == {
        "data.num_frames": [3, config.data.num_frames]}
  assert res["checkpoint"] == str(tmp_path / "export")
  # A training workdir: the results name the step read (its best changes
  # while the run trains).
  ckpt = checkpoint.Checkpointer(tmp_path / "run")
  ckpt.save_best(5, checkpoint.load_variables(tmp_path / "export"),
                 {"miou": 0.5})
  ckpt.close()
  res = trainer.evaluate_checkpoint(config, str(tmp_path / "wd"),
                                    str(tmp_path / "run"), "validation",
                                    source=source)
  assert res["checkpoint"] == str(tmp_path / "run" / "best" / "5")


def test_a_notice_during_the_validation_loses_no_step(reference_run, tmp_path,
                                                      monkeypatch):
  """A Ctrl-C (or SIGTERM) during an epoch's validation: the epoch's last
  step was saved before it, the validation stops at its next batch (an
  AVSS validation takes minutes; a spot VM gives 30 s), and the resume
  validates that step first. Before, the step was saved after the
  validation: a notice waited for it, a kill lost the epoch's steps.
  Validation scores and results are the uninterrupted run's."""
  sys.path.insert(0, os.path.dirname(__file__))
  from avsegformer_jax import errors, evaluation, run_log, trainer
  from train_driver import synthetic_source, tiny_config
  sources = {"train": synthetic_source(10, 2, 40, 0),
             "validation": synthetic_source(6, 2, 40, 1)}

  def train(wd):
    return trainer.train_and_evaluate(tiny_config(), str(wd),
                                      source_fn=sources.get)

  def log(wd):
    with open(wd / run_log.EVAL_LOG) as f:
      return [json.loads(line) for line in f]

  d1, _ = reference_run                       # the same run, uninterrupted
  with open(d1 / "wd" / "train_results.json") as f:
    whole = json.load(f)
  real = evaluation.evaluate
  def interrupted(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)       # Ctrl-C as it starts
    time.sleep(0.1)
    return real(*args, **kwargs)
  monkeypatch.setattr(evaluation, "evaluate", interrupted)
  wd = tmp_path / "wd"
  with pytest.raises(errors.Preempted, match="stopped at step 3 on Ctrl-C"):
    train(wd)                                 # epoch 1 ends at step 3
  assert _steps(wd)[-1] == 3 and not (wd / run_log.EVAL_LOG).exists()
  assert not (wd / "best").exists() or not os.listdir(wd / "best")
  monkeypatch.setattr(evaluation, "evaluate", real)
  assert train(wd) == whole
  assert [r["step"] for r in log(wd)] == [3, 6]
  assert log(wd) == log(d1 / "wd")
  for line in log(wd):   # per category; one here, so the split's own scores
    cat = line["per_category"]["synthetic"]
    assert cat["num_clips"] == 6
    np.testing.assert_allclose([cat["miou"], cat["fscore"]],
                               [line["miou_dataset"], line["fscore_dataset"]],
                               rtol=1e-6)
  assert whole["per_category"] == log(wd)[-1]["per_category"]
  assert train(wd) == whole                   # finished: nothing again
  assert len(log(wd)) == 2
