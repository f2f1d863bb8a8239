"""main.py --distributed as launch/slurm_gpu.sbatch runs it: two tasks of
one SLURM job step (its environment, emulated on localhost), each finding
the cluster through jax.distributed.initialize() with no arguments, train
and evaluate the demo config as one run. Process 0 writes the synthetic
dataset while the other waits (both writing it raced)."""
import json
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python main.py ARGS`, with both tasks writing the XLA cache (process 1's
# programs would otherwise be compiled afresh in every run: cluster_cache.py).
MAIN = ("import runpy, sys; sys.path.insert(0, 'tests'); import cluster_cache; "
        "cluster_cache.enable(); sys.argv[0] = 'main.py'; "
        "runpy.run_path('main.py', run_name='__main__')")


def _slurm_step(tmp_path, args, timeout, stop_on_failure=True):
  """Runs `main.py --distributed ARGS` as the 2 tasks of a SLURM step;
  returns their exit statuses (None: killed at `timeout`), stdouts and
  stderrs."""
  procs, logs = [], []
  for i in range(2):
    env = dict(os.environ, SLURM_JOB_ID=str(4000 + os.getpid() % 4000),
               SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
               SLURM_PROCID=str(i), SLURM_LOCALID=str(i),
               SLURM_STEP_NUM_NODES="1", JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    logs.append(tmp_path / f"task_{i}.log")
    with open(logs[i], "w") as err:
      procs.append(subprocess.Popen(
          [sys.executable, "-c", MAIN, "--distributed", *args],
          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True))
  outs = ["", ""]
  deadline = time.time() + timeout
  try:
    for i, p in enumerate(procs):
      try:
        outs[i] = p.communicate(timeout=max(1, deadline - time.time()))[0]
      except subprocess.TimeoutExpired:
        break
      if p.returncode != 0 and stop_on_failure:
        break             # the other one would wait for it in a collective
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
        p.returncode = None
  return [p.returncode for p in procs], outs, [l.read_text() for l in logs]


def test_distributed_demo_under_an_emulated_slurm_step(tmp_path):
  wd = tmp_path / "wd"
  codes, outs, errs = _slurm_step(
      tmp_path, ["--config=configs/demo.py", f"--workdir={wd}",
                 "--config.data.synthetic.num_videos=16",
                 "--config.train.num_epochs=1",
                 "--config.eval.shuffled_audio_control=False"], timeout=1200)
  for code, err in zip(codes, errs):
    assert code == 0, err[-3000:]
  res = [json.loads(o[o.index("{"):]) for o in outs]
  assert res[0] == res[1] and res[0]["num_clips"] == 2, res
  assert 0 <= res[0]["miou"] <= 1
  # 2 steps of one global batch of 8 clips (4 per process), logged at the
  # end, saved at the epoch's end.
  with open(wd / "train_metrics.jsonl") as f:
    assert [json.loads(l)["step"] for l in f] == [2]
  assert sorted(os.listdir(wd / "checkpoints")) == ["2"]


def test_every_task_stops_when_another_run_trains_in_the_workdir(tmp_path):
  """Process 0 alone takes the workdir's lock. Refused, it used to stop by
  itself and wait at JAX's shutdown barrier while the other task waited in
  its first barrier, until both were aborted with stack dumps after 305 s.
  Now both stop at once with the same line, before any data is written."""
  from avsegformer_jax import files  # pylint: disable=g-import-not-at-top
  wd = tmp_path / "wd"
  wd.mkdir()
  with files.exclusive(wd):                    # the other run: this test
    codes, _, errs = _slurm_step(
        tmp_path, ["--config=configs/demo.py", f"--workdir={wd}"],
        timeout=150, stop_on_failure=False)
  for code, err in zip(codes, errs):
    assert code == 2, err[-3000:]
    assert err.strip().splitlines()[-1] == (
        f"main.py: error: {wd}: another run trains there (pid {os.getpid()} "
        f"on {socket.gethostname()} since {err.split(' since ')[1][:19]}); "
        "stop it, or give another --workdir"), err[-3000:]
  assert os.listdir(wd) == [files.LOCK_FILE]
