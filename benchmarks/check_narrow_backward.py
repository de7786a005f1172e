"""CUDA check of `attnlab.ops.sparse.enable_narrow_backward`: a 64-token global_sparse pattern's forward and backward
through FlexAttention with 64-token blocks (forward and backward) against the same module's torch backend (the
blockwise reference path), bf16 and fp32. Prints one line per case; exits 1 on a mismatch.

    PYTHONPATH=src python benchmarks/check_narrow_backward.py
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

import attnlab
from attnlab.ops.sparse import enable_narrow_backward

sys.path.insert(0, str(Path(__file__).parent))
from model_bench import synthetic_pattern  # noqa: E402


def main(argv=None) -> int:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    if not torch.cuda.is_available():
        print("check_narrow_backward.py checks FlexAttention's CUDA kernels: no CUDA device here")
        return 2
    assert enable_narrow_backward(64), "no inductor choices hook in this torch"
    from transformers import LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, hidden_size=256)
    t, bad = 1024, 0
    folder = synthetic_pattern(cfg, t, Path(tempfile.mkdtemp()) / "pattern")
    for dtype, tol in ((torch.float32, 2e-5), (torch.bfloat16, 2e-2)):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(2, 4, t, 64, device="cuda", generator=g).to(dtype) for _ in range(3))
        grads = {}
        for backend in ("torch", "flex"):
            m = attnlab.make("global_sparse", head_dim=64, num_heads=4, pattern=str(folder), sparsity=0.9,
                             layer=0, backend=backend).cuda()
            qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
            out, _ = m(qq, kk, vv, causal=True)
            out.float().pow(2).sum().backward()
            grads[backend] = [out.float()] + [x.grad.float() for x in (qq, kk, vv)]
        for name, a, b in zip(("out", "dq", "dk", "dv"), grads["torch"], grads["flex"]):
            err = ((a - b).norm() / a.norm().clamp_min(1e-30)).item()
            ok = err <= tol and torch.isfinite(b).all().item()
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {dtype} {name}: relative error {err:.2e} (tolerance {tol:.0e})", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
