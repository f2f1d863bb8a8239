#!/usr/bin/env bash
# The GPU numbers for issue 6 in < 9 minutes on one H100/H200, in waves by
# priority. On the device, compiling a train step (host CPU plus XLA's
# autotuning on the GPU) takes minutes and running it milliseconds, so each
# wave runs its sections at once: compiles overlap, and a process times its
# steps only while it holds the device and no other process compiles (XLA
# autotunes on the device; benchmarks/common.py, BENCH_DEVICE_LOCK; nothing
# preallocates). Compile times under that contention are longer than alone.
# The first H100 session of this script (2026-11-26) ran seven compiles at
# once: the inference rows finished, no train step compiled within 240 s.
# So train sections run three at a time at most, with cuBLAS GEMMs
# (--xla_gpu_enable_triton_gemm=false: no Triton tile search, as the
# deviceless compile that takes 132 s on 2 cores).
#   wave 1: where the S4 train step's time goes (`benchmarks.profile`:
#           XLA's trace, each kernel charged to its module; PVTv2-B5 and
#           ResNet-50, 16 clips, remat); beside them the GPU path of the
#           parity tests (pytest, tests_gpu.txt)
#   wave 2: the eval step's profile (32 clips), cuDNN attention alone at
#           inference, the eval step unrolled; the train step with while
#           loops in CUDA graphs (XLA command buffers)
#   both:   the PVTv2-B5 train step unrolled (the default config's layout)
#   last:   the input pipeline, frame 0 only (if time is left)
# What the first two GPU sessions measured (inference, the train-step A/B of
# rbg / hash / cuDNN / Triton MSDA, AVSS batch 4, the MSDA cores, the
# pipeline with all frames) is in benchmarks/README.md, "GPU table"; git
# history has the script that measured it.
# Each section has a time limit and writes <name>.{json,txt,err} to $WORK as
# it ends; a section that would start after TOTAL_S is skipped. Everything
# ends up in $OUT/bench.tgz (the device tool returns at most 8 files).
#
#   bash benchmarks/run_gpu.sh        # from the repository root
#   OUT=/somewhere TOTAL_S=420 bash benchmarks/run_gpu.sh
#   SMOKE=1 OUT=/tmp/smoke bash benchmarks/run_gpu.sh   # tiny configs, any
#                              # machine: checks the script before a device
#
# The lent GPU machine's image lacks the data stack (grain, TFDS,
# ml_collections, librosa): benchmarks/gpu_wheels.sh fetches its wheels here
# and its header gives the install line that begins the device command.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
WORK=${WORK:-$OUT/bench}
TOTAL_S=${TOTAL_S:-560}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=${PYTHONPATH:-}:.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export BENCH_DEVICE_LOCK=$WORK/device.lock
: > "$BENCH_DEVICE_LOCK"
START=$(date +%s)
section() {   # name limit_s args...
  local name=$1 limit=$2 el; shift 2
  el=$(( $(date +%s) - START ))
  if (( el + 20 > TOTAL_S )); then echo "-- skip $name (${el}s elapsed)"; return; fi
  (( el + limit > TOTAL_S )) && limit=$(( TOTAL_S - el ))
  echo "== $name (limit ${limit}s, ${el}s elapsed)"
  timeout "$limit" $PY "$@" --json "$WORK/$name.json" >"$WORK/$name.txt" \
    2>"$WORK/$name.err"
  local rc=$?
  echo "== $name done, exit $rc, $(( $(date +%s) - START ))s elapsed"
  cat "$WORK/$name.txt"
  [ "$rc" = 0 ] || { grep "^row:" "$WORK/$name.err";
                     grep -v "Warning\|^row:" "$WORK/$name.err" | tail -4; }
}
pack() { tar czf "$OUT/bench.tgz" -C "$WORK" . 2>/dev/null; }
trap pack EXIT
{ $PY -c "import jax, flax; print(jax.devices(), 'jax', jax.__version__, 'flax', flax.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  echo "cpus $(nproc)"; } 2>&1 | tee "$WORK/device.txt"

M="-m benchmarks.model --scan true --dtypes bfloat16"
S4P=s4_pvt2_224 S4R=s4_res50_224 B=16 BE=32
PSIZES=224,512 PWORKERS=0,4,8 PIPE_S=90 ATTN=cudnn TESTS_S=240
# (test_deformable_attention_pallas.py's other tests run Pallas' interpreter,
# meant for CPU: on a GPU they crawl, and stopped the 2026-11-27 run.)
PT=tests/test_deformable_attention_pallas.py
TESTS=(tests/test_avsegformer.py tests/test_deformable_attention.py
       $PT::test_triton_kernels_on_a_gpu_match_the_xla_core
       $PT::test_compiles_to_triton_kernels_for_an_h100
       tests/test_losses.py tests/test_audio.py tests/test_dropout.py)
if [ "${SMOKE:-0}" = 1 ]; then     # (cuDNN attention: GPUs only)
  S4P=tiny_pvt2 S4R=tiny_res50 B=2 BE=2 ATTN=xla
  TESTS=(tests/test_deformable_attention_pallas.py)
  PSIZES=32 PWORKERS=0
fi
CUBLAS=--xla_gpu_enable_triton_gemm=false
# The GPU path of the tests: the full-size golden parity tests in float32
# ("highest" precision), the MSDA cores' goldens, and the compiled Pallas
# kernels against "taps" (real atomics), the hash dropout's bits against its
# Python reference (the same masks on every backend), beside wave 1's
# compiles. Marked as
# compiling for its whole run, so no section times its steps meanwhile.
gpu_tests() {
  local el=$(( $(date +%s) - START ))
  echo "== tests_gpu (limit ${TESTS_S}s, ${el}s elapsed)"
  $PY -c "import subprocess, sys
from benchmarks import common
with common.compiling():
  sys.exit(subprocess.call(sys.argv[1:]))" timeout "$TESTS_S" $PY -m pytest \
    -v -p no:cacheprovider "${TESTS[@]}" >"$WORK/tests_gpu.txt" 2>&1
  echo "== tests_gpu done, exit $?, $(( $(date +%s) - START ))s elapsed"
  tail -25 "$WORK/tests_gpu.txt"
}
gpu_tests &
# Wave 1 (the questions the H200 run of 2026-11-27 left, benchmarks/README.md
# "GPU table"): where the scanned S4 train step's time goes (80 ms there,
# 2.4x its roofline bound: slow kernels, or a device idle between them?),
# and the same for ResNet-50.
# Across both waves: the PVTv2-B5 step with its layers unrolled, as the
# default config trains (model.scan_layers=False; every GPU figure so far
# was scanned). Deviceless H100, 2-core VM, 2026-11-28: unrolled 30.0 ms by
# the roofline, 10,787 launches, plan 4.03 GiB, XLA compile 199 s; scanned
# 32.3 ms, 11,972, 4.32 GiB, 48 s. Without while loops XLA's command
# buffers (CUDA graphs) can hold the whole step: if launch gaps are what
# the scanned step loses, this row shows it. Its compile (~4x the scanned
# one's; the 11-27 H200 took 107 s for a scanned one under contention) gets
# both waves' time. One compile per process.
P="-m benchmarks.profile --dtype bfloat16 --scan true --steps 3 --top 40"
XLA_FLAGS=$CUBLAS section train_s4_pvt2_unrolled 500 -m benchmarks.model \
  --scan false --dtypes bfloat16 --configs $S4P --remat true \
  --phases unfrozen --batch $B --steps 5 &
XLA_FLAGS=$CUBLAS section profile_train_s4_pvt2 300 $P --config $S4P \
  --remat true --phase unfrozen --batch $B & W=($!)
XLA_FLAGS=$CUBLAS section profile_train_s4_res50 300 $P --config $S4R \
  --remat true --phase unfrozen --batch $B & W+=($!)
wait "${W[@]}"
# Wave 2: inference: its profile, and cuDNN attention alone (with the
# Triton MSDA it gave +9% frames/s on 2026-11-27: the MSDA's share is the
# rest); the scanned train step with its layers' while loops (and conds)
# recorded into CUDA graphs too (XLA's command buffers hold fusions
# and library calls by default): ~12,000 kernel launches a step.
section profile_eval_s4_pvt2 150 $P --config $S4P --remat false \
  --phase eval --batch $BE &
section eval_b32_cudnn 150 $M --configs $S4P --attention_impl $ATTN \
  --phases eval --eval_batch $BE --steps 10 &
# The eval step unrolled, as evaluation and predict run it by default: the
# same roofline as scanned (57 ms), 1,613 launches against 2,948.
section eval_b32_unrolled 150 -m benchmarks.model --scan false \
  --dtypes bfloat16 --configs $S4P --phases eval --eval_batch $BE --steps 10 &
XLA_FLAGS="$CUBLAS --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
  section train_s4_pvt2_remat_cmdbuf 220 $M --configs $S4P --remat true \
  --phases unfrozen --batch $B --steps 5 &
wait
# The host side: can this machine's CPUs feed the steps above? (S4 at 224
# and 512, frame 0 only, as S4 + PVTv2 trains; all 5 frames: 2026-11-27.)
section pipeline_s4_frame0 $PIPE_S -m benchmarks.input_pipeline --task s4 \
  --sizes $PSIZES --workers $PWORKERS --clips 40 --frame_size 288 --batch 8 \
  --batches 15 --train_frames 1 --data_dir "$WORK/pipeline_data"
rm -rf "$WORK/pipeline_data"
echo "total $(( $(date +%s) - START ))s; results in $OUT/bench.tgz"
