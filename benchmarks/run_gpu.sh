#!/usr/bin/env bash
# The GPU numbers for issue 6, in priority order, in < 8 minutes on one
# H100/H200: MSDA cores; the model table in bfloat16 (4 configs, B=1 clip);
# AVSS PVTv2-B5 batch 4 with remat (the 16 GB target); inference frames/s;
# the remat x scan compile-time study; the model table in float32. Every
# section has its own time limit and writes $OUT/<section>.{json,txt,err}
# as soon as it ends; sections that would start after TOTAL_S are skipped.
#
#   bash benchmarks/run_gpu.sh        # from the repository root
#   OUT=/somewhere TOTAL_S=420 bash benchmarks/run_gpu.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
TOTAL_S=${TOTAL_S:-450}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 PYTHONPATH=${PYTHONPATH:-}:.
START=$(date +%s)
section() {   # name limit_s args...
  local name=$1 limit=$2 el; shift 2
  el=$(( $(date +%s) - START ))
  if (( el + 20 > TOTAL_S )); then echo "-- skip $name (${el}s elapsed)"; return; fi
  (( el + limit > TOTAL_S )) && limit=$(( TOTAL_S - el ))
  echo "== $name (limit ${limit}s, ${el}s elapsed)"
  timeout "$limit" $PY "$@" --json "$OUT/$name.json" 2>"$OUT/$name.err" \
    | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "!! $name exit $rc"; grep "^row:" "$OUT/$name.err";
                     grep -v "Warning\|^row:" "$OUT/$name.err" | tail -4; }
}
{ $PY -c "import jax, flax; print(jax.devices(), 'jax', jax.__version__, 'flax', flax.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; } \
  2>&1 | tee "$OUT/device.txt"

# Scanned layers keep each compile short; the study at the end compares.
# A first H100 try of the full table (3 compiles per config, 5 steps) needed
# > 100 s per config, so the table is split by priority.
section msda 60 -m benchmarks.msda --dtypes float32,bfloat16 --steps 10
section model_bf16 200 -m benchmarks.model --dtypes bfloat16 --scan true \
  --phases eval,unfrozen --steps 5
section avss_b4_remat 60 -m benchmarks.model --configs avss_pvt2_224 \
  --dtypes bfloat16 --remat true --scan true --phases unfrozen --batch 4 \
  --steps 3
section eval_b16 45 -m benchmarks.model --configs s4_pvt2_224,s4_res50_224 \
  --dtypes bfloat16 --scan true --phases eval --eval_batch 16 --steps 10
section model_f32 150 -m benchmarks.model --dtypes float32 --scan true \
  --phases eval,unfrozen --steps 5
section compile_study 120 -m benchmarks.model --configs s4_pvt2_224 \
  --dtypes bfloat16 --scan false,true --remat false,true --phases frozen \
  --steps 2
section frozen_bf16 120 -m benchmarks.model --dtypes bfloat16 --scan true \
  --phases frozen --steps 5
echo "total $(( $(date +%s) - START ))s; results in $OUT"
