#!/usr/bin/env bash
# SmolLM2-135M runs on the lent GPU in one or more consecutive calls (benchmarks/README.md: the GGUF travels in two
# parts; the first call parks .gpu/gguf.part0 in /tmp/park). Steps run in the order given, each under its own
# `timeout`; `setup` joins the parts, converts the model once into /tmp (kept while the machine stays warm, so a
# later call can name steps without `setup`), and every step's files go to $WORK, packed into $OUT/smollm2.tgz.
#   OUT=$OUT bash benchmarks/smollm2_gpu.sh setup speed parallel advise     # second call of the chain
#   OUT=$OUT bash benchmarks/smollm2_gpu.sh sparsify                        # a later call, machine still warm
# Steps: speed (distill step throughput, alone), decode (press decode tokens/s, alone), parallel (distill quality
# runs, the 2048-token scan side by side: their times share the GPU), advise (alone: it times attention layers),
# sparsify (8192 tokens, with --cost).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT}
WORK=${WORK:-/tmp/smollm2_gpu}
mkdir -p "$OUT" "$WORK"
export ATTNLAB_CACHE=/tmp/acache PYTHONPATH=$PWD/src:/tmp/site:/tmp/gsite TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
log() { echo "[$(date -u +%T)] $*" | tee -a "$WORK/steps.log"; }
A="python3 -m attnlab"
for step in "$@"; do
  log "step $step"
  case $step in
    setup)
      cp /tmp/park/gguf.part0 .gpu/ && python3 -m pip install -q --no-deps --no-index --target /tmp/site .whl/*.whl
      mkdir -p /tmp/acache && cp -r .gpu/cache/. /tmp/acache/
      python3 benchmarks/distill_gpu.py prepare && rm -rf /tmp/gsite && cp -r .gpu/site /tmp/gsite
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >> "$WORK/steps.log"
      python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' >> "$WORK/steps.log" ;;
    speed)
      timeout 150 python3 benchmarks/distill_gpu.py speed --out "$WORK/speed" --runs /tmp/speed_runs > "$WORK/speed.log" 2>&1 ;;
    decode)
      timeout 150 python3 benchmarks/press_decode.py --device cuda --prompt-lens 2048,8000 --new-tokens 64 \
        --presses streaming_llm,snapkv,h2o --evict 0.5,0.9 --bounds 1024 --out "$WORK/decode/decode.json" > "$WORK/decode.log" 2>&1 ;;
    parallel)
      for run in ${QUALITY_RUNS:-learned_mask-0.5 learned_mask-content-0.25 performer-learned hedgehog-long}; do
        timeout ${PARALLEL_LIMIT:-290} python3 benchmarks/distill_gpu.py quality --only "$run" --budget 60 \
          --out "$WORK/quality/$run" --runs "/tmp/q_runs/$run" > "$WORK/quality-$run.log" 2>&1 &
      done
      timeout ${PARALLEL_LIMIT:-290} $A scan --methods window,linear,performer --seq-len 2048 --num-tokens 4096 \
        --device cuda --dtype bfloat16 --no-progress --out "$WORK/scan" > "$WORK/scan.log" 2>&1 &
      wait ;;
    advise)
      timeout 150 $A advise --methods window,linear,performer --scan "$WORK/scan/scan.json" --seq-len 2048 \
        --num-tokens 4096 --cost-len 8192 --max-kl ${MAX_KL:-0.05} --device cuda --dtype bfloat16 --no-progress \
        --out "$WORK/advise" > "$WORK/advise.log" 2>&1 ;;
    sparsify)
      timeout ${SPARSIFY_LIMIT:-240} $A sparsify --device cuda --dtype bfloat16 --seq-len 8192 --windows 4 --eval-windows 2 \
        --sparsity 0,0.5,0.9 --cost --no-progress --out "$WORK/sparsify" > "$WORK/sparsify.log" 2>&1 ;;
    *) log "unknown step $step" ;;
  esac
  log "step $step rc=$?"
done
tar -czf "$OUT/smollm2.tgz" -C "$WORK" --exclude='*.safetensors' --exclude='checkpoint*' . && cp "$WORK/steps.log" "$OUT/"
