#!/usr/bin/env bash
# Re-measure the kernelised / low-rank / LSH methods after a speed change, without the peers (their rows
# from the full sweep stay valid: same GPU kind, same inputs; the README table takes the latest row per key).
#   bash benchmarks/gpu_rerun.sh checks    # gpu_checks.py (~3 min on an H100, mostly torch.compile)
#   bash benchmarks/gpu_rerun.sh tune      # tune_chunks.py (~2 min)
#   bash benchmarks/gpu_rerun.sh fwd       # attnlab bench, fwd, non-causal and causal, 4k/16k/64k
#   bash benchmarks/gpu_rerun.sh fwd+bwd   # the same, fwd+bwd
#   bash benchmarks/gpu_rerun.sh quick     # gpu_checks.py --quick for METHODS (the changed kernels' methods)
#   bash benchmarks/gpu_rerun.sh model     # model_bench.py, interleaved, the original sdpa model beside METHODS
#                                          # (default sdpa,window,linear,performer,global_sparse); COMPILE=--compile
#                                          # for regional compilation, GRAPH=--cuda-graph for steps captured as CUDA
#                                          # graphs; DEVICE / DTYPE (cuda / bfloat16) for a dry run
# Env: OUT (default benchmarks/results/rerun), METHODS, LENGTHS, BUDGET (seconds per bench call), CAUSAL
# (--both-causal by default; --causal for causal only), NAME (file stem, default rerun_fwd / rerun_fwdbwd).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/rerun}"
METHODS="${METHODS:-linear,performer,rfa,linformer,nystrom,lsh}"
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
case "${1:-}" in
  checks)
    python3 benchmarks/gpu_checks.py 2>&1 | tee "$OUT/gpu_checks.txt" | grep -v "^ok " ; echo "checks rc=${PIPESTATUS[0]}"
    grep -c "^ok " "$OUT/gpu_checks.txt" | sed 's/^/ok checks: /' ;;
  tune)
    python3 benchmarks/tune_chunks.py --out "$OUT" --chunks "${CHUNKS:-64,128,256}" 2>&1 | grep -v Warning | tail -80 ;;
  fwd|fwd+bwd)
    name=$(echo "$1" | tr -d '+')
    python3 -m attnlab bench --methods "$METHODS" --peers none --lengths "${LENGTHS:-4096,16384,65536}" \
      --batch 4,16384:1 --heads 16 --head-dim 64 --dtype bf16 --mode "$1" ${CAUSAL:---both-causal} --device cuda \
      --warmup 3 --repeats 10 --no-progress --out "$OUT" --name "${NAME:-rerun_$name}" --time-budget "${BUDGET:-400}" 2>&1 \
      | grep -v "Warning\|warn(" | tail -60 ;;
  quick)
    python3 benchmarks/gpu_checks.py "$METHODS" --quick 2>&1 | tee "$OUT/gpu_checks_quick.txt" | grep -v "^ok " ;
    echo "checks rc=${PIPESTATUS[0]}" ;;
  model)
    python3 benchmarks/model_bench.py --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" \
      --lengths "${LENGTHS:-1024,4096,16384,32768,65536}" --originals sdpa --modes "${MODES:-fwd,fwd+bwd}" \
      --methods "${MODEL_METHODS:-sdpa,window,linear,performer,global_sparse}" --repeats "${REPEATS:-5}" \
      --budget-s "${BUDGET:-400}" --out "$OUT/model${COMPILE:+_compile}${GRAPH:+_graph}" ${COMPILE:-} ${GRAPH:-} 2>&1 \
      | grep -v "Warning\|warn(\|^W1202\|axes\[" | tail -80 ;;
  *) echo "usage: $0 checks|tune|fwd|fwd+bwd|quick|model"; exit 2 ;;
esac
