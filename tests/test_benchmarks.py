"""The benchmark command runs end to end (tiny config, one step, in-process)
and writes every field the table promises, with sane values."""
import json

import numpy as np
import pytest

from benchmarks import common
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
                    "--phases", "eval,frozen", "--pipeline",
                    "--dtypes", "float32", "--json", str(out)])
  printed = capsys.readouterr().out
  assert "tiny_pvt2" in printed and "clips/s" in printed
  assert "pipe clips/s" in printed and "pipe fr/s" in printed
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
  # XLA's plan holds at least the parameters it is given (tiny: ~4 MB f32).
  assert row["plan_bytes"] >= row["eval_plan_bytes"] > 2**20
  assert 0 < row["train_frozen_plan_temp_bytes"] < row["train_frozen_plan_bytes"]
  # The input pipeline beside the steps, for the config's frames and workers
  # (tiny: PVTv2 trained on frame 0 alone).
  assert row["pipeline_train_frames"] == 1 and row["pipeline_workers"] >= 0
  assert row["pipeline_train_clips_per_s"] > 0
  assert row["pipeline_eval_frames_per_s"] > 0


def test_unknown_config_is_named(capsys):
  import pytest
  with pytest.raises(SystemExit):
    bench_model.parse_args(["--configs", "s4_vit_224"])
  assert "s4_vit_224" in capsys.readouterr().err


def test_matmul_flops_counts_scan_bodies_and_convs():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      return nn.Dense(16)(x), None

  x = jnp.ones((4, 16))
  scanned = nn.scan(Block, variable_axes={"params": 0},
                    split_rngs={"params": True}, length=5)()
  params = scanned.init(jax.random.PRNGKey(0), x, None)
  fn = jax.jit(lambda p, x: scanned.apply(p, x, None)[0])
  one = 2 * 4 * 16 * 16
  # XLA's cost analysis counts this while-loop body once; we want 5 bodies.
  assert common.matmul_flops(fn.trace(params, x).jaxpr) == 5 * one
  # Gradient: forward, and two matmuls per layer backward.
  grad = jax.jit(jax.grad(lambda p, x: fn(p, x).sum()))
  assert common.matmul_flops(grad.trace(params, x).jaxpr) == 3 * 5 * one
  # A 3x3 conv, 2 groups: out elements x window x input channels per group.
  img, ker = jnp.ones((2, 8, 8, 6)), jnp.ones((3, 3, 3, 10))
  conv = jax.jit(lambda a, b: jax.lax.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=2))
  assert common.matmul_flops(conv.trace(img, ker).jaxpr) == \
      2 * (2 * 8 * 8 * 10) * (3 * 3 * 3)
  # cond: the costlier branch, once.
  cond = jax.jit(lambda p, a: jax.lax.cond(p, lambda a: a @ a @ a,
                                           lambda a: a @ a, a))
  assert common.matmul_flops(cond.trace(True, jnp.ones((8, 8))).jaxpr) == \
      2 * 2 * 8 * 8 * 8


def test_memory_plan_counts_temporaries_and_donation():
  import jax
  import jax.numpy as jnp

  mib = 2**20
  x = jax.ShapeDtypeStruct((512, 512), jnp.float32)            # 1 MiB
  # (x @ x) @ x keeps a 1 MiB product alive; nothing runs.
  compiled, _, _ = common.aot_compile(jax.jit(lambda x: (x @ x) @ x), x)
  plan = common.memory_plan(compiled)
  assert plan["argument"] == plan["output"] == mib and plan["alias"] == 0
  assert plan["temp"] >= mib
  assert plan["total"] == 2 * mib + plan["temp"]
  # A donated argument that becomes the output is counted once.
  donated = jax.jit(lambda x: x * 2 + 1, donate_argnums=0)
  plan = common.memory_plan(common.aot_compile(donated, x)[0])
  assert plan["alias"] == mib
  assert plan["total"] == mib + plan["temp"]


def test_plan_compiles_without_running_and_scales_with_batch():
  from benchmarks import plan as bench_plan
  mesh = bench_plan.target_mesh("local", 1)
  rows = [bench_plan.plan_row("tiny_pvt2", "float32", False, False, 1, b,
                              ("eval",), mesh) for b in (1, 2)]
  one, two = rows
  # Every op of the eval step is per frame but the combination of `fc_2`'s
  # kernel into its phase kernel (CPU, head.UpsampledConv: per call, on the
  # weights): FLOPs double but for that, counted once in either.
  assert one["eval_flops"] > 1e9
  per_call = 2 * one["eval_flops"] - two["eval_flops"]
  # At most every kernel entry [3,3,128,32] times every pair of taps (4x4
  # phases x 3x3 conv taps), a multiply and an add.
  assert 0 < per_call <= 2 * (3 * 3 * 128 * 32) * (4 * 4 * 3 * 3), per_call
  # Same parameters; one more clip of frames, audio, labels, flags in the
  # arguments: T x (64x64x3 uint8 frame + 64x64 uint8 mask + 96x64 float32
  # audio) + 2T + 1 float32 flags.
  t = one["frames_per_clip"]
  assert two["eval_plan_argument_bytes"] - one["eval_plan_argument_bytes"] \
      == t * (64 * 64 * 3 + 64 * 64 + 96 * 64 * 4) + (2 * t + 1) * 4
  assert two["eval_plan_temp_bytes"] > one["eval_plan_temp_bytes"]
  assert "eval_plan_total_bytes" in one and "train_frozen_flops" not in one
  assert "eval" in bench_plan.table(rows) and "plan GiB" in \
      bench_plan.table(rows)


def test_plan_gpu_target_needs_the_cuda_plugin_or_compiles_for_it():
  from benchmarks import plan as bench_plan
  try:
    mesh = bench_plan.target_mesh("h100", 1)
  except SystemExit as e:                     # CI: no CUDA plugin installed
    assert "jax[cuda12]" in str(e) and "h100" in str(e)
    return
  (device,) = mesh.devices.flat
  assert "H100" in device.device_kind
  # model.attention_impl="cudnn" lowers to cuDNN's flash attention for it,
  # forward and backward, with 1029 keys (padded), and the roofline counts
  # its seven GEMMs.
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from avsegformer_jax import layers
  from benchmarks import roofline
  sharding = NamedSharding(mesh, P())
  q = jax.ShapeDtypeStruct((2, 300, 8, 32), jnp.bfloat16, sharding=sharding)
  k = jax.ShapeDtypeStruct((2, 1029, 8, 32), jnp.bfloat16, sharding=sharding)
  grad = jax.grad(lambda q, k: layers.fused_attention(q, k, k).astype(
      jnp.float32).sum(), argnums=(0, 1))
  text = jax.jit(grad).lower(q, k).compile().as_text()
  assert "__cudnn$fmhaSoftmax\"" in text
  assert "__cudnn$fmhaSoftmaxBackward" in text
  assert roofline.estimate(text)["total"]["flops"] >= \
      7 * 2 * (2 * 8 * 304 * 1032) * 32


def test_plan_tpu_target_needs_libtpu_or_compiles_for_it():
  from benchmarks import plan as bench_plan
  try:
    mesh = bench_plan.target_mesh("v5e", 2)
  except SystemExit as e:                     # CI: no libtpu installed
    assert "jax[tpu]" in str(e) and "v5e" in str(e)
    return
  assert mesh.devices.size == 2
  assert all("v5" in d.device_kind for d in mesh.devices.flat)
  with pytest.raises(SystemExit, match="at most 4 chips"):
    bench_plan.target_mesh("v5e", 8)


_COMPILER = """
import sys, time
from benchmarks import common
with common.compiling():
  open(sys.argv[1] + ".started", "w").close()
  time.sleep(1.5)
  end = time.time()
open(sys.argv[1] + ".ended", "w").write(repr(end))
"""


def test_timing_waits_for_other_processes_compiles(tmp_path, monkeypatch):
  """XLA:GPU autotunes on the device while compiling: a process sharing the
  device (--jobs) must not time its steps meanwhile."""
  import os
  import subprocess
  import sys
  import time
  lock = str(tmp_path / "device.lock")
  monkeypatch.setenv("BENCH_DEVICE_LOCK", lock)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.Popen([sys.executable, "-c", _COMPILER, lock], cwd=root,
                          env={**os.environ, "PYTHONPATH": root})
  try:
    deadline = time.time() + 60
    while not os.path.exists(lock + ".started"):
      assert time.time() < deadline and proc.poll() is None
      time.sleep(0.02)
    with common.device_to_itself(poll_s=0.02):
      entered = time.time()
  finally:
    proc.wait(timeout=60)
  with open(lock + ".ended") as f:
    assert entered >= float(f.read())
  # A marker left by a process that died (killed at a time limit) is ignored.
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  open(os.path.join(lock + ".d", str(dead.pid)), "w").close()
  t = time.time()
  with common.device_to_itself(poll_s=0.02):
    assert time.time() - t < 5


def test_model_flops_leave_out_the_recomputation():
  """MFU counts the model's FLOPs: a rematerialised step runs more (its
  forwards again), `model_flops` reports the step's count without remat."""
  import jax
  from avsegformer_jax import avsegformer, train
  config = bench_model.make_config("tiny_pvt2", "float32", remat=True,
                                   scan=True)
  mesh = train.make_mesh()
  plain = avsegformer.build_model(config)
  state = jax.eval_shape(lambda r: train.create_train_state(config, plain, r),
                         jax.random.PRNGKey(0))
  batch = bench_model.random_batch(config, 1)

  def traced_flops(c):
    steps = train.Steps(avsegformer.build_model(c, axis_name=train.AXIS), c,
                        mesh)
    return common.matmul_flops(steps._train.trace(state, batch).jaxpr)
  hardware = traced_flops(config)
  model = bench_model.model_flops(config, mesh, state, batch, hardware)
  config.model.remat = False
  assert model == traced_flops(config) < hardware
  assert bench_model.model_flops(config, mesh, state, batch, 7.0) == 7.0


def test_input_pipeline_benchmark_counts_what_it_delivers(tmp_path, capsys):
  """`benchmarks.input_pipeline` on a tiny synthetic S4: all five frames,
  then the first only (the S4 + PVTv2 training load)."""
  from benchmarks import input_pipeline as bench_pipe
  args = ["--clips", "6", "--frame_size", "32", "--sizes", "16", "--workers", "0",
          "--batches", "3", "--data_dir", str(tmp_path / "data")]
  rows = bench_pipe.main(args + ["--json", str(tmp_path / "all.json")])["rows"]
  rows += bench_pipe.main(args + ["--train_frames", "1"])["rows"]
  assert "clips/s" in capsys.readouterr().out
  assert [r["frames_per_clip"] for r in rows] == [5, 1]
  for r in rows:
    assert r["clips"] == 3 * 2 and r["clips_per_s"] > 0
    np.testing.assert_allclose(r["frames_per_s"],
                               r["clips_per_s"] * r["frames_per_clip"])
  assert json.loads((tmp_path / "all.json").read_text())["rows"][0]["split"] == "train"


# What the lent GPU image already holds of setup.cfg's install_requires
# (device KINDS.md, 2026-11), and what gpu_wheels.sh leaves out on purpose.
GPU_IMAGE_HAS = {"jax", "flax", "optax", "orbax-checkpoint", "absl-py", "numpy",
                 "pillow", "tqdm"}
GPU_WHEELS_LEAVE_OUT = {"av"}


def test_gpu_wheels_pin_every_missing_requirement_within_setup_cfg():
  """benchmarks/gpu_wheels.sh pins a version, inside setup.cfg's range, of
  each runtime requirement the GPU image lacks: a range bumped in setup.cfg
  without the pins (or a new requirement) fails here, not on the device."""
  import configparser
  import pathlib
  import re
  from packaging.requirements import Requirement
  root = pathlib.Path(__file__).resolve().parents[1]
  cfg = configparser.ConfigParser()
  cfg.read(root / "setup.cfg")
  reqs = [Requirement(line) for line in
          cfg["options"]["install_requires"].split("\n") if line.strip()]
  norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
  script = (root / "benchmarks" / "gpu_wheels.sh").read_text()
  pins = {norm(n): v for n, v in
          re.findall(r"([A-Za-z0-9_.\-]+)==([0-9][0-9A-Za-z.]*)", script)}
  for req in reqs:
    name = norm(req.name)
    if name in GPU_IMAGE_HAS | GPU_WHEELS_LEAVE_OUT:
      continue
    assert name in pins, f"gpu_wheels.sh does not fetch {req}"
    assert req.specifier.contains(pins[name]), (
        f"gpu_wheels.sh pins {name}=={pins[name]} outside setup.cfg's {req}")


def test_override_flags_take_the_config_fields_type():
  """`--attention_dropout 0` must set the float 0.0 (a string would fail
  deep in the model), and name-valued overrides stay strings."""
  a = bench_model.parse_args(["--attention_impl", "cudnn",
                              "--attention_dropout", "0", "--prng_impl", "rbg"])
  config = bench_model.make_config("tiny_pvt2", "bfloat16",
                                   overrides=bench_model.given_overrides(a))
  assert config.model.attention_dropout == 0.0
  assert isinstance(config.model.attention_dropout, float)
  assert (config.model.attention_impl, config.train.prng_impl) == \
      ("cudnn", "rbg")
  assert config.model.msda_impl == "auto"              # not given: unchanged
  # A combination's subprocess gets them as strings and parses them back
  # (a float in the command line failed in subprocess, SMOKE run_gpu.sh).
  cmd = bench_model.subprocess_cmd(a, "tiny_pvt2", "bfloat16", True, True,
                                   "row.json")
  assert all(isinstance(x, str) for x in cmd), cmd
  back = bench_model.parse_args(cmd[3:])
  assert bench_model.given_overrides(back) == bench_model.given_overrides(a)
