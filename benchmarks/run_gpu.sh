#!/usr/bin/env bash
# The GPU numbers for issue 6 in < 9 minutes on one H100/H200, in waves by
# priority. Compiling (host CPU, tens of seconds per step) costs far more
# than running, so each wave runs its sections at once and the combinations
# inside a section with --jobs: compiles overlap on the host's cores while
# timed steps take turns on the device (one lock file, BENCH_DEVICE_LOCK;
# nothing preallocates). Compile times under that contention are longer than
# alone; the compile study runs alone, last.
#   wave 1: bf16 model table (4 configs, eval + unfrozen, B=1), AVSS PVTv2-B5
#           batch 4 with remat (the 16 GB target), inference at 32 clips
#   wave 2: float32 model table, bf16 with the backbone frozen
#   wave 3: MSDA cores; remat x scan compile study (alone)
# Each section has a time limit and writes <name>.{json,txt,err} to $WORK as
# it ends; a section that would start after TOTAL_S is skipped. Everything
# ends up in $OUT/bench.tgz (the device tool returns at most 8 files).
#
#   bash benchmarks/run_gpu.sh        # from the repository root
#   OUT=/somewhere TOTAL_S=420 bash benchmarks/run_gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
WORK=${WORK:-$OUT/bench}
TOTAL_S=${TOTAL_S:-480}
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

M="-m benchmarks.model --scan true"
section model_bf16 240 $M --dtypes bfloat16 --phases eval,unfrozen --steps 5 \
  --jobs 4 &
section avss_b4_remat 240 $M --configs avss_pvt2_224 --dtypes bfloat16 \
  --remat true --phases unfrozen --batch 4 --steps 3 &
section eval_b32 150 $M --configs s4_pvt2_224,s4_res50_224 --dtypes bfloat16 \
  --phases eval --eval_batch 32 --steps 10 --jobs 2 &
wait
section model_f32 200 $M --dtypes float32 --phases eval,unfrozen --steps 5 \
  --jobs 4 &
section frozen_bf16 200 $M --dtypes bfloat16 --phases frozen --steps 5 \
  --jobs 4 &
wait
section msda 60 -m benchmarks.msda --dtypes float32,bfloat16 --steps 10
section compile_study 150 -m benchmarks.model --configs s4_pvt2_224 \
  --dtypes bfloat16 --scan false,true --remat false,true --phases frozen \
  --steps 2
echo "total $(( $(date +%s) - START ))s; results in $OUT/bench.tgz"
