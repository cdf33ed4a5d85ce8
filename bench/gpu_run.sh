#!/usr/bin/env bash
# The ONE script to run on a GPU host (H100/H200), from the repository root, in about 8 minutes:
#   OUT=/some/dir bash bench/gpu_run.sh
# It runs tests/gpu_equivalence.py and bench/pipeline.py when they exist (each capped), then the whole
# GPU benchmark with the time that is left (cases in priority order; the rest are recorded as skipped).
# Everything lands under $OUT: results.json, results.md, gpu_run.log, plus what the two other scripts write.
# Carried wheels in .whl/ (e.g. grain, for the end-to-end loop) are installed first; see bench/NOTES.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench-out-gpu}
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-470}        # the whole script's wall-clock target
LAST_CASE_S=${LAST_CASE_S:-120} # room for the case that starts just before the budget runs out
mkdir -p "$OUT"
LOG="$OUT/gpu_run.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
START=$(date +%s)
elapsed() { echo $(($(date +%s) - START)); }

{
  echo "== gpu_run.sh $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  if compgen -G ".whl/*.whl" >/dev/null; then
    echo "== installing carried wheels: $(ls .whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  "$PY" - <<'EOF'
import importlib.metadata as md
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
             "torch", "triton", "timm", "grain", "numpy"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
EOF
} >"$LOG" 2>&1

if [ -f tests/gpu_equivalence.py ]; then
  echo "== tests/gpu_equivalence.py ($(elapsed) s)" | tee -a "$LOG"
  timeout 100 "$PY" tests/gpu_equivalence.py --out "$OUT" 2>&1 | tee -a "$LOG"
  echo "== gpu_equivalence exit ${PIPESTATUS[0]}" | tee -a "$LOG"
fi
if [ -f bench/pipeline.py ]; then
  echo "== bench/pipeline.py ($(elapsed) s)" | tee -a "$LOG"
  timeout 70 "$PY" bench/pipeline.py --out "$OUT" 2>&1 | tee -a "$LOG"
  echo "== pipeline exit ${PIPESTATUS[0]}" | tee -a "$LOG"
fi

BUDGET=$((TOTAL_S - $(elapsed) - LAST_CASE_S))
[ "$BUDGET" -lt 60 ] && BUDGET=60
echo "== bench.benchmark with --budget-s $BUDGET ($(elapsed) s)" | tee -a "$LOG"
timeout $((BUDGET + LAST_CASE_S + 30)) "$PY" -m bench.benchmark --out "$OUT" --budget-s "$BUDGET" \
  --case-timeout-s "$LAST_CASE_S" 2>&1 | tee -a "$LOG"
echo "== benchmark exit ${PIPESTATUS[0]}; total $(elapsed) s" | tee -a "$LOG"
