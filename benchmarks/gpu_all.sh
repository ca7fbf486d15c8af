#!/usr/bin/env bash
# The GPU benchmark set in one go, sized for a lent machine's 15 minutes with room for one rerun: the captured step
# checked against the eager one (tests/test_cuda_graphs.py on CUDA), train_cost's step rows eager and captured as CUDA
# graphs (HFF simultaneous, balanced memory_efficient, BP), inference; bf16 autocast, channels_last, CUDA-event
# timing. Estimated 4-6 minutes on one H100 / H200 (train_cost's full ten methods took 297 s on the H200; these are
# six, memory measured for the three eager ones). Run from the repository root:
#
#     bash benchmarks/gpu_all.sh                 # writes benchmarks/results/gpu/<name>/, prints all tables last
#     ACC_EPOCHS=5 bash benchmarks/gpu_all.sh    # + the accuracy benchmark (5 epochs; the Fashion-MNIST IDX files)
#     TC_METHODS=all bash benchmarks/gpu_all.sh  # train_cost with every method (about 5 minutes more)
#     FRONTIER=1 bash benchmarks/gpu_all.sh      # + train_cost --frontier: every BP memory technique beside HFF's
#       settings, micro-batches included, the Pareto set marked (issue 35; 13 methods, about 7 minutes more)
#     EXIT_MODEL=local-dir:output/greedy25/c64/model bash benchmarks/gpu_all.sh   # + early exit on a saved model
#       (batch 1 and 256, bf16; thresholds fitted on its validation hold-out; the Fashion-MNIST IDX files needed)
#
# Each step's output goes to $OUT/<name>.log; the tables are printed together at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
ACC_EPOCHS="${ACC_EPOCHS:-0}"
TC_METHODS="${TC_METHODS:-hff_simultaneous hff_balanced bp}"
start=$(date +%s)
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_all.sh needs a CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step() {   # name (the module, or module:folder for a second run of one), then its arguments
    local name=${1#*:} module=${1%%:*}; shift
    local t0=$(date +%s)
    echo "== $name ($(( t0 - start ))s elapsed) ==" >&2
    rm -rf "$OUT/$name"   # never print an older run's table as this run's
    if python -m "benchmarks.$module" --device cuda --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1; then
        echo "== $name done in $(( $(date +%s) - t0 ))s ==" >&2
    else
        echo "== $name FAILED after $(( $(date +%s) - t0 ))s; last lines of $OUT/$name.log: ==" >&2
        tail -n 20 "$OUT/$name.log" >&2
        return 1
    fi
}
mkdir -p "$OUT"
status=0
echo "== captured vs eager steps ($(( $(date +%s) - start ))s elapsed) ==" >&2
if python -c "import pytest" 2>/dev/null; then
    python -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py -k on_cuda > "$OUT/cuda_graphs_test.log" 2>&1 \
        || { status=1; tail -n 30 "$OUT/cuda_graphs_test.log" >&2; }
    tail -n 1 "$OUT/cuda_graphs_test.log" >&2
else
    echo "pytest not installed: captured-vs-eager test skipped" | tee "$OUT/cuda_graphs_test.log" >&2
fi
tc_methods=()
[ "$TC_METHODS" = all ] || tc_methods=(--methods $TC_METHODS)
step train_cost --cuda-graphs "${tc_methods[@]}" || status=1
step inference || status=1
names="train_cost inference"
if [ "${FRONTIER:-0}" = 1 ]; then
    step train_cost:train_cost_frontier --frontier || status=1
    names="$names train_cost_frontier"
fi
if [ "$ACC_EPOCHS" -gt 0 ]; then
    step accuracy --epochs "$ACC_EPOCHS" || status=1
    names="$names accuracy"
fi
if [ -n "${EXIT_MODEL:-}" ]; then
    step early_exit --model "$EXIT_MODEL" --batch-sizes 1 256 --rounds 3 || status=1
    names="$names early_exit"
fi

echo
echo "# GPU benchmark results ($(( $(date +%s) - start ))s in all)"
for name in $names; do
    echo
    if [ -f "$OUT/$name/results.md" ]; then cat "$OUT/$name/results.md"; else echo "### $name: FAILED (see $OUT/$name.log)"; fi
done
exit $status
