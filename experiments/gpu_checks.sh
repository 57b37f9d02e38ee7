#!/usr/bin/env bash
# Every GPU check of the project in one call (device time is scarce: one run per session).
#
#   OUT=/some/folder GRAPH=path/to/metr-la/adj_mx.pkl bash experiments/gpu_checks.sh
#
# Parts run in order of importance, each under its own time limit and all under
# one overall budget (BUDGET_S, default 480 s), so a slow or failing part
# cannot take the results of the others with it.  Writes under $OUT:
#   gpu.log                  everything printed, including tests/test_cuda.py (CUDA vs CPU numerics,
#                            each attention kernel at d = 8, no host sync, Lightning bf16, compiled Lightning)
#   gpu_epoch_L3_<v>.json    one METR-LA-size epoch of the hand-written step, L = 3: compile-graph
#                            (whole step in one CUDA graph; cuDNN attention, and flash with _no-cudnn),
#                            compile-ro, graph (eager kernels, 600 steps, plus the attention probe);
#                            _combo: compile-graph with Inductor's combo_kernels (profile: _combo_kernels)
#   lightning_epoch_L3.json  the same epoch through gman's Lightning module (compile_mode default,
#                            with and without per-step loss logging)
#   gpu_epoch_L1_compile-graph.json  L = 1 (the published RTX 5000 Ada figure is for L = 1)
#   profile_L3_compile-graph[_no-cudnn].txt  kernels by GPU time over 10 profiled steps
#   benchmark_gpu.json       benchmark.py --preset issue, bf16 autocast, eager
#   scale_gpu.json           scale_benchmark.py dense vs group, bf16 autocast
# Needs torch, lightning and pandas; no mlflow.  The device tool brought back 8 files of $OUT per
# call in session 6 and left the rest out: every part also prints its JSON records into gpu.log.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to a folder for the results}
GRAPH=${GRAPH:-${GMAN_SHARED_DATA:-../shared/data}/graphs/metr-la/adj_mx.pkl}
BUDGET_S=${BUDGET_S:-480}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
START=$(date +%s)
LOG=$OUT/gpu.log

part() {  # part NAME LIMIT_S COMMAND...: run under min(LIMIT_S, what is left of the budget)
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - START) ))
  (( left < limit )) && limit=$left
  if (( limit < 15 )); then echo "## $name: skipped, budget spent" | tee -a "$LOG"; return; fi
  echo "## $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
  local t0=$(date +%s)
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  echo "## $name: exit $? after $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, lightning, torch_geometric, pandas; print('torch', torch.__version__, 'lightning', lightning.__version__, 'pyg', torch_geometric.__version__, 'pandas', pandas.__version__)"
} >>"$LOG" 2>&1
tail -n 3 "$LOG"

E="$PY experiments/gpu_epoch.py --graph $GRAPH --warmup 10"
PROFILE="--profile-steps 10 --profile-dir $OUT"
part "gpu_epoch L3 compile-graph" 110 $E $PROFILE --variants compile-graph --json "$OUT/gpu_epoch_L3_compile-graph.json"
# the step is latency-bound (1,345 kernels in 8.35 ms on an H100): Inductor's combo kernels launch
# independent small kernels (e.g. the spatial and temporal branches' batch-norms) as one
part "gpu_epoch L3 compile-graph, combo kernels" 110 $E $PROFILE --variants compile-graph --inductor combo_kernels=True \
    --json "$OUT/gpu_epoch_L3_compile-graph_combo.json"
part test_cuda 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -o addopts= -rA
part "lightning epoch L3 compile, compile-quiet" 200 $PY experiments/lightning_epoch.py --graph "$GRAPH" \
    --variants compile,compile-quiet --json "$OUT/lightning_epoch_L3.json"
part "gpu_epoch L3 compile-graph, flash attention" 100 $E $PROFILE --variants compile-graph --sdpa no-cudnn \
    --json "$OUT/gpu_epoch_L3_compile-graph_no-cudnn.json"
part "gpu_epoch L1 compile-graph" 80 $E --layers 1 --variants compile-graph --json "$OUT/gpu_epoch_L1_compile-graph.json"
part "gpu_epoch L3 compile-ro" 100 $E --variants compile-ro --json "$OUT/gpu_epoch_L3_compile-ro.json"
part "gpu_epoch L3 graph (600 steps) + attention probe" 50 $E --variants graph --max-steps 600 --attention-probe \
    --json "$OUT/gpu_epoch_L3_graph.json"
part "benchmark issue preset" 60 $PY experiments/benchmark.py --preset issue --device cuda --amp bf16 --steps 20 \
    --json "$OUT/benchmark_gpu.json"
part "scale dense vs group" 70 $PY experiments/scale_benchmark.py --device cuda --amp bf16 --dense-max-gib 1000 \
    --json "$OUT/scale_gpu.json"

echo "## total $(( $(date +%s) - START ))s" | tee -a "$LOG"
grep -h '"variant"' "$LOG" | cut -c1-400
grep -E "passed|failed|error" "$LOG" | tail -n 3
