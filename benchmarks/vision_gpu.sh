#!/usr/bin/env bash
# `attnlab vision` on the lent GPU (no network there): Fashion-MNIST travels as the four idx.gz files of Debian's
# dataset-fashion-mnist in .gpu/fmnist (git-ignored, 30 MB; `cp /usr/share/datasets/fashion-mnist/*.gz .gpu/fmnist/`),
# attnlab runs from src/. Every argument goes to `attnlab vision`; rows land in $OUT as each method finishes.
#   bash benchmarks/vision_gpu.sh --patch 4 --epochs 10
set -euo pipefail
cd "$(dirname "$0")/.."
export ATTNLAB_FASHION_MNIST=${ATTNLAB_FASHION_MNIST:-.gpu/fmnist}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-benchmarks/results/vision}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -c "import matplotlib" 2>/dev/null || NOPLOT=--no-plot
python3 -m attnlab vision --device cuda --out "$OUT" --no-progress ${NOPLOT:-} "$@"
