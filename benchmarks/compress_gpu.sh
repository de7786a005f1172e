#!/usr/bin/env bash
# `attnlab compress train` on the lent GPU, several runs side by side on the one device (each model is small), then
# `attnlab compress eval` over every model that finished. No network there: carry .gpu/minilm-tok (MiniLM's
# tokenizer files: `python -c "from attnlab.compress.store import load_tokenizer as t; t('minilm').save_pretrained('.gpu/minilm-tok')"`)
# and .gpu/cache (the sotu and brown corpora from `attnlab data fetch`).
#   RUNS="0.5:0 0.25:0 0.125:0" OUT=/tmp/x bash benchmarks/compress_gpu.sh --steps 2000
# RUNS: ratio:seed[:bias[:latent_dim]] words; every argument goes to each `compress train`. Runs write $RUNDIR/r<ratio>-s<seed>[-bias][-l<dim>]
# (default $OUT); with RUNDIR elsewhere (the device returns few files) their result.json and log.jsonl come back packed
# in $OUT/runs.tgz, beside compress.json from `compress eval`.
set -uo pipefail
cd "$(dirname "$0")/.."
export ATTNLAB_CACHE=${ATTNLAB_CACHE:-$PWD/.gpu/cache} PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results/compress/h200}
TOK=${TOK:-.gpu/minilm-tok}
LIMIT=${LIMIT:-420}  # seconds each training may take
RUNDIR=${RUNDIR:-$OUT}
mkdir -p "$OUT" "$RUNDIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
pids=()
for run in ${RUNS:-0.5:0}; do
  IFS=: read -r ratio seed bias latent <<< "$run"
  name="r$ratio-s$seed${bias:+-$bias}${latent:+-l$latent}"
  timeout "$LIMIT" python3 -m attnlab compress train --ratio "$ratio" --seed "$seed" --bias "${bias:-distance}" \
    ${latent:+--latent-dim $latent} \
    --tokenizer "$TOK" --device cuda --no-progress --out "$RUNDIR/$name" "$@" > "$RUNDIR/$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || echo "a run ended with status $?"; done
tail -n 2 "$RUNDIR"/*.log
models=$(ls -d "$RUNDIR"/*/model 2>/dev/null | paste -sd, -)
[ -n "$models" ] && timeout "${EVAL_LIMIT:-120}" python3 -m attnlab compress eval --models "$models" --device cuda --out "$OUT" --no-plot
if [ "$RUNDIR" != "$OUT" ]; then
  (cd "$RUNDIR" && tar czf "$OUT/runs.tgz" *.log */result.json */log.jsonl */config.json 2>/dev/null)
fi
