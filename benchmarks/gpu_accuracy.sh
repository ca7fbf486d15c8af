#!/usr/bin/env bash
# Issue 11's runs on a GPU, side by side: HFF vs BP vs Forward-Forward at the greedy recipe's budget (FF's learning
# rate and threshold swept on validation; HFF and BP reuse the recipe's stored runs when their settings match) and the
# backprop baseline of the per-block recipe. Run from the repository root:
#
#     bash benchmarks/gpu_accuracy.sh                          # benchmarks/results/accuracy_recipe/, per_block/
#     RESULTS=/tmp/smoke WORK=/tmp/smoke_work SET="--epochs 1 --train_num_samples 640" \
#         bash benchmarks/gpu_accuracy.sh                      # a smoke test, written elsewhere
#
# DEADLINE (seconds, default 3000) stops runs still going then; their per-epoch validation rows stay in their logs.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SET=${SET:-}
DEADLINE=${DEADLINE:-3000}
RESULTS=${RESULTS:-benchmarks/results}
WORK=${WORK:-output/gpu_accuracy}
JOBS=${JOBS:-4}
PER_BLOCK=${PER_BLOCK:-bp}   # which per-block runs to make here: 'hff bp', 'bp' or ''
start=$(date +%s)
mkdir -p "$WORK"
"$PY" -m benchmarks.accuracy --recipe recipes/fashion_mnist.yaml --jobs "$JOBS" --ff-chunk 5000 \
    --out "$RESULTS/accuracy_recipe" --work "$WORK/three_way" --set="$SET" > "$WORK/three_way.log" 2>&1 &
pids=($!)
for m in $PER_BLOCK; do
    rm -rf "$WORK/per_block/$m"   # a rerun trains afresh (hff-train refuses a folder holding another run)
    base=$([ "$m" = bp ] && echo --baseline bp)
    # shellcheck disable=SC2086
    "$PY" -m timm_hff.train --config recipes/fashion_mnist_per_block.yaml $base --output "$WORK/per_block" \
        --experiment "$m" --progress false $SET > "$WORK/per_block_$m.log" 2>&1 &
    pids+=($!)
done
last=0
while :; do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    now=$(( $(date +%s) - start ))
    [ $alive = 0 ] && break
    if [ $now -ge "$DEADLINE" ]; then
        echo "== deadline ${DEADLINE}s: stopping the runs still going ==" >&2
        for p in "${pids[@]}"; do pkill -TERM -P "$p"; kill -TERM "$p"; done 2>/dev/null   # ours only
        sleep 3; break
    fi
    if [ $(( now - last )) -ge 60 ]; then
        last=$now
        echo "== ${now}s ==" >&2
        for f in "$WORK"/three_way/*.log "$WORK"/per_block_*.log; do
            [ -f "$f" ] && echo "$(basename "$f"): $(grep -a '^epoch' "$f" | tail -n 1 | cut -c1-110)" >&2
        done
    fi
    sleep 5
done
wait 2>/dev/null
for m in $PER_BLOCK; do   # keep each per-block run's config, metrics and log
    run="$WORK/per_block/$m"; keep="$RESULTS/per_block/$m"
    [ -f "$run/metrics.json" ] || { echo "per-block $m: no metrics (see $WORK/per_block_$m.log)" >&2; continue; }
    mkdir -p "$keep"
    for f in config.yaml metrics.json metrics.csv; do [ -f "$run/$f" ] && cp "$run/$f" "$keep/"; done
    cp "$WORK/per_block_$m.log" "$keep/train.log"
    "$PY" -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu', 'torch', torch.__version__)" > "$keep/machine.txt"
done
echo "== done in $(( $(date +%s) - start ))s ==" >&2
tail -n 40 "$WORK/three_way.log"
for m in $PER_BLOCK; do grep -a '^epoch\|^test' "$WORK/per_block_$m.log" | tail -n 3; done
