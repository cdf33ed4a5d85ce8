#!/usr/bin/env bash
# The ONE script to run on a GPU host (H100/H200), from the repository root:
#   OUT=/some/dir bash bench/gpu_run.sh
# In TOTAL_S seconds (default 480) it runs, in this order and each capped:
#   1. tests/gpu_equivalence.py --out $OUT   (if the file exists; cap EQUIV_S, default 90)
#   2. python -m bench.benchmark --out $OUT  (cases in priority order; it stops starting new ones when its
#      budget is spent and lists the rest as skipped; the budget is what 1 and 3 leave)
#   3. only with PARTS=...,demo: the README's main job on the GPU, python -m train.flax --data demo (256 px,
#      bf16; DEMO_S reserved, default 150); its output and summary.json go into gpu_run.log
# PARTS=bench (or equivalence,demo, ...) runs a subset; BENCH_ARGS adds benchmark flags, e.g. for a
# second call: PARTS=bench BENCH_ARGS="--only torch/*/compile* --only e2e/*" (see bench/NOTES.md).
# The input-pipeline benchmark (bench/pipeline.py) is at commit c6262d4 (bench/NOTES.md section 0).
# On a CPU (a check of this script): PARTS=bench BENCH_ARGS="--quick --skip torch/*/compile*" TOTAL_S=400.
# Carried wheels in .whl/ (grain and friends, for the real training loop) are installed first.
# Files written to $OUT by this script: results.json, results.md, gpu_run.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out-gpu}
PY=${PYTHON:-python3}
PARTS=${PARTS:-equivalence,bench}
TOTAL_S=${TOTAL_S:-480}
EQUIV_S=${EQUIV_S:-90}
DEMO_S=${DEMO_S:-150}
LAST_CASE_S=${LAST_CASE_S:-100}       # kept for the benchmark case that starts just before its budget ends
CASE_TIMEOUT_S=${CASE_TIMEOUT_S:-180} # hard limit per case (the real-loop cases get twice this)
BENCH_ARGS=${BENCH_ARGS:-}
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }
want() { [[ ",$PARTS," == *",$1,"* ]]; }

{
  echo "== gpu_run.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname); PARTS=$PARTS TOTAL_S=$TOTAL_S"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing carried wheels: $(ls .whl | tr '\n' ' ')"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
             "torch", "triton", "timm", "grain", "tensorboardX", "numpy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
EOF
} >"$LOG" 2>&1

if want equivalence && [ -f tests/gpu_equivalence.py ]; then
  echo "== tests/gpu_equivalence.py ($(elapsed) s)" | tee -a "$LOG"
  timeout "$EQUIV_S" "$PY" tests/gpu_equivalence.py --out "$OUT" 2>&1 | tee -a "$LOG"
  echo "== gpu_equivalence exit ${PIPESTATUS[0]} ($(elapsed) s)" | tee -a "$LOG"
fi

if want bench; then
  RESERVE=0
  want demo && RESERVE=$DEMO_S
  BUDGET=$((TOTAL_S - $(elapsed) - RESERVE - LAST_CASE_S))
  [ "$BUDGET" -lt 60 ] && BUDGET=60
  echo "== bench.benchmark --budget-s $BUDGET $BENCH_ARGS ($(elapsed) s)" | tee -a "$LOG"
  # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
  timeout $((BUDGET + 2 * CASE_TIMEOUT_S)) "$PY" -m bench.benchmark --out "$OUT" --budget-s "$BUDGET" \
    --case-timeout-s "$CASE_TIMEOUT_S" $BENCH_ARGS 2>&1 | tee -a "$LOG"
  echo "== benchmark exit ${PIPESTATUS[0]} ($(elapsed) s)" | tee -a "$LOG"
fi

if want demo; then
  LEFT=$((TOTAL_S - $(elapsed)))
  [ "$LEFT" -lt 60 ] && LEFT=60
  RUN=/tmp/demo-gpu-run
  echo "== python -m train.flax --data demo, cap $LEFT s ($(elapsed) s)" | tee -a "$LOG"
  timeout "$LEFT" "$PY" -m train.flax --data demo --workdir "$RUN" --overwrite --keep-checkpoints 1 2>&1 \
    | tee -a "$LOG" | grep -v "^step "
  echo "== demo exit ${PIPESTATUS[0]} ($(elapsed) s)" | tee -a "$LOG"
  cat "$RUN/summary.json" >>"$LOG" 2>&1
fi
echo "== gpu_run.sh done in $(elapsed) s" | tee -a "$LOG"
