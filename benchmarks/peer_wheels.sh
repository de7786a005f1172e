#!/usr/bin/env bash
# The peers' wheels for the GPU machine (no network there), into .whl/ (git-ignored, ~1.2 MB), from PyPI, here:
#   bash benchmarks/peer_wheels.sh        # then carry [".whl"] with the device call (gpu_sweep.sh installs them)
# Pure-Python wheels, pinned, each with the pure-Python packages it imports (--no-deps: torch and einops are on the
# GPU machine already). Checked by importing each peer from the wheels alone (the last step).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(
  performer-pytorch==1.1.4 axial-positional-embedding==0.3.12     # performer-pytorch imports axial_positional_embedding
  reformer-pytorch==1.4.4 product-key-memory==0.3.0 colt5-attention==0.11.2  # reformer -> product_key_memory -> colt5
  linformer==0.2.3 nystrom-attention==0.0.14
  local-attention==1.11.2 hyper-connections==0.4.11 torch-einops-utils==0.2.0  # local-attention's imports
  fla-core==0.6.0                                                 # fla: causal linear / performer beside fla-core's kernels
)
mkdir -p .whl
python3 -m pip download -q --no-deps -d .whl "${WHEELS[@]}"
SITE="$(mktemp -d /tmp/attnlab_peers.XXXXXX)"
python3 -m pip install -q --no-deps --no-index --target "$SITE" .whl/*.whl
for m in performer_pytorch reformer_pytorch linformer nystrom_attention local_attention fla; do
  PYTHONPATH="$SITE" python3 -c "import $m" 2>/dev/null || { echo "peer_wheels.sh: $m does not import from .whl/ alone"; exit 1; }
done
rm -rf "$SITE"
echo "peer wheels in .whl/: $(ls .whl/*.whl | wc -l) files, $(du -sh .whl | cut -f1)"
