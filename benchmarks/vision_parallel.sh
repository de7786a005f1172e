#!/usr/bin/env bash
# Several `attnlab vision` processes side by side on one GPU (the ViT at patch 4 leaves an H200 mostly idle: each
# process is bound by its kernel launches), one per group of methods, each under the same `timeout`; for accuracy
# within one call's time. Their epoch times share the GPU: not a speed measurement (time ratios come from a
# sequential run). Every other argument goes to each `attnlab vision` (identical seeds and hyper-parameters).
#   SETS="nystrom lsh sdpa,rfa dense,performer linear,window linformer,block_sparse" LIMIT=420 OUT=$OUT/p4 \
#     bash benchmarks/vision_parallel.sh --patch 4 --epochs 30
# Leaves $OUT/rows.jsonl (every finished row, with `concurrent_processes`) and $OUT/runs.tgz (each group's files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/vision_parallel}
SETS=${SETS:?name the groups of methods, e.g. SETS="dense,sdpa linear"}
LIMIT=${LIMIT:-420}
RUNS=$(mktemp -d /tmp/vision_runs.XXXXXX)
mkdir -p "$OUT"
n=0; for g in $SETS; do n=$((n + 1)); done
i=0
for g in $SETS; do
  i=$((i + 1))
  OUT=$RUNS/g$i timeout "$LIMIT" bash benchmarks/vision_gpu.sh --methods "$g" "$@" > "$RUNS/g$i.log" 2>&1 &
done
wait
python3 - "$RUNS" "$OUT/rows.jsonl" "$n" <<'PY'
import glob, json, sys
runs, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(out, "w") as fh:
    for f in sorted(glob.glob(f"{runs}/g*/*.jsonl")):
        for line in open(f):
            row = json.loads(line)
            row["concurrent_processes"] = n
            fh.write(json.dumps(row) + "\n")
print(open(out).read())
PY
tar -czf "$OUT/runs.tgz" -C "$RUNS" .
