#!/usr/bin/env bash
# The full cost sweep on one GPU, in one command (about 9 minutes on an H100), run from the repository root
# with the peer wheels carried in .whl/ (`bash benchmarks/peer_wheels.sh` makes them; see benchmarks/README.md):
#   bash benchmarks/gpu_sweep.sh            # all four configurations: fits ~9 min; some long lengths may be "skipped"
#   bash benchmarks/gpu_sweep.sh fwd        # the two fwd configurations, with 2.5x the time each (~9 min)
#   bash benchmarks/gpu_sweep.sh fwd+bwd    # the two fwd+bwd configurations, with 2.5x the time each (~9 min)
# Env overrides: OUT (default benchmarks/results/gpu_sweep), LENGTHS (comma list), METHODS (comma list for
# --methods, METHOD@BACKEND allowed; default every method), BUDGET_FWD / BUDGET_BWD (seconds per configuration).
#
# Four processes (non-causal/causal x fwd/fwd+bwd): a CUDA error or a hang costs one configuration, not the
# sweep. Each has a soft time budget (an impl's lengths past its share are recorded as "skipped") and a hard
# `timeout`; rows are written after every measurement, so a killed process keeps what it measured.
# $OUT receives five files: sweep.json (every row), sweep.png, sweep.crossover.json, sweep_run.txt
# (environment, exact commands, tables, errors) and a copy of this script.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_sweep}"
WORK="$(mktemp -d /tmp/attnlab_sweep.XXXXXX)"
mkdir -p "$OUT"
T0=$(date +%s)
LOG="$OUT/sweep_run.txt"
: > "$LOG"

# Peers: wheels carried in .whl/ (no network on the GPU machine); attnlab itself from src/.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || echo "peer wheels failed to install: peers will show as 'not installed'" | tee -a "$LOG"
fi
export PYTHONPATH=/tmp/site:$PWD/src
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # fewer fragmentation OOMs after an OOM row

cp "$0" "$OUT/gpu_sweep.sh"
{
  echo "# environment"; date -u +%FT%TZ; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import sys, torch, triton, einops; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, "einops", einops.__version__)'
  python3 - <<'PY'
import importlib
for m in ("performer_pytorch", "linformer", "nystrom_attention", "reformer_pytorch", "local_attention", "fla"):
    try:
        mod = importlib.import_module(m); print(m, "imports", getattr(mod, "__version__", ""))
    except Exception as e:  # noqa: BLE001
        print(m, "FAILS:", type(e).__name__, e)
PY
  echo "PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF"
} >> "$LOG" 2>&1
cat "$LOG"

PART="${1:-all}"
case "$PART" in
  all) BF=${BUDGET_FWD:-90}; BB=${BUDGET_BWD:-140} ;;
  fwd|fwd+bwd) BF=${BUDGET_FWD:-230}; BB=${BUDGET_BWD:-230} ;;
  *) echo "usage: $0 [all|fwd|fwd+bwd]"; exit 2 ;;
esac
COMMON=(--lengths "${LENGTHS:-1024,2048,4096,8192,16384,32768,65536}" --batch 4,16384:1 --heads 16 --head-dim 64
        --dtype bf16 --device cuda --warmup 3 --repeats 10 --row-budget 1.0 --max-row-seconds 60 --out "$WORK"
        --methods "${METHODS:-all}")
run() {  # run NAME BUDGET_S ARGS...
  local name=$1 budget=$2; shift 2
  local cmd=(python3 -m attnlab bench "${COMMON[@]}" --name "$name" --time-budget "$budget" "$@")
  echo "== $name (budget ${budget}s, at +$(( $(date +%s) - T0 ))s)" | tee -a "$LOG"
  echo "PYTHONPATH=/tmp/site:src ${cmd[*]}" >> "$LOG"
  timeout -k 5 $(( budget + 25 )) "${cmd[@]}" > "$WORK/$name.log" 2> "$WORK/$name.err"
  local rc=$?
  if [ $rc -ne 0 ]; then
    echo "   $name exited rc=$rc (124 = hard timeout; rows so far are kept)" | tee -a "$LOG"
    tail -c 2000 "$WORK/$name.err" | tr '\r' '\n' | grep -v 'row/s' | tail -15 >> "$LOG"
  fi
  cat "$WORK/$name.log" >> "$LOG"
  grep -c '"status": "ok"' "$WORK/$name.json" 2>/dev/null | sed 's/^/   ok rows: /'
}
if [ "$PART" != "fwd+bwd" ]; then
  run fwd_noncausal    "$BF" --mode fwd
  run fwd_causal       "$BF" --mode fwd --causal
fi
if [ "$PART" != "fwd" ]; then
  run fwdbwd_noncausal "$BB" --mode fwd+bwd
  run fwdbwd_causal    "$BB" --mode fwd+bwd --causal
fi

# Merge: one JSON of every row, one PNG over the configurations, the crossover table.
python3 - "$WORK" "$OUT" <<'PY' 2>&1 | tee -a "$LOG"
import collections, glob, json, sys
work, out = sys.argv[1:]
rows = []
for name in ("fwd_noncausal", "fwd_causal", "fwdbwd_noncausal", "fwdbwd_causal"):
    try:
        rows += json.load(open(f"{work}/{name}.json"))
    except FileNotFoundError:
        pass
json.dump(rows, open(f"{out}/sweep.json", "w"), indent=1)
print("status counts:", dict(collections.Counter(r["status"] for r in rows)))
for r in rows:
    if r["status"] == "error":
        print("ERROR", r["mode"], r["causal"], r["method"], r["impl"], r["seq_len"], (r["error"] or "")[:200])
PY
python3 -m attnlab.bench.plot "$OUT/sweep.json" --out "$OUT/sweep.png" 2>&1 | tee -a "$LOG" | tail -70
echo "sweep done in $(( $(date +%s) - T0 ))s; results in $OUT" | tee -a "$LOG"
