#!/usr/bin/env bash
# The whole GPU benchmark set in one go (about 5-8 minutes on one H100): inference, train_cost, accuracy with
# bf16 autocast, channels_last and CUDA-event timing. Run from the repository root:
#
#     bash benchmarks/gpu_all.sh                 # writes benchmarks/results/gpu/<name>/, prints all tables last
#     ACC_EPOCHS=2 bash benchmarks/gpu_all.sh    # shorter accuracy run
#     EXIT_MODEL=local-dir:output/greedy25/c64/model bash benchmarks/gpu_all.sh   # + early exit on a saved model
#       (batch 1 and 256, bf16; thresholds fitted on its validation hold-out; the Fashion-MNIST IDX files needed)
#
# Each step's output goes to $OUT/<name>.log; the tables are printed together at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
ACC_EPOCHS="${ACC_EPOCHS:-5}"
start=$(date +%s)
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_all.sh needs a CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

step() {   # name, then its arguments
    local name=$1; shift
    local t0=$(date +%s)
    echo "== $name ($(( t0 - start ))s elapsed) ==" >&2
    rm -rf "$OUT/$name"   # never print an older run's table as this run's
    if python -m "benchmarks.$name" --device cuda --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1; then
        echo "== $name done in $(( $(date +%s) - t0 ))s ==" >&2
    else
        echo "== $name FAILED after $(( $(date +%s) - t0 ))s; last lines of $OUT/$name.log: ==" >&2
        tail -n 20 "$OUT/$name.log" >&2
        return 1
    fi
}
mkdir -p "$OUT"
status=0
step inference || status=1
step train_cost || status=1
step accuracy --epochs "$ACC_EPOCHS" || status=1
names="inference train_cost accuracy"
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
