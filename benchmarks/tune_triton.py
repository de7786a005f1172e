"""The causal linear-attention Triton kernels on the GPU: agreement with the PyTorch path, and launch settings.

    PYTHONPATH=src python benchmarks/tune_triton.py --out benchmarks/results/triton    # ~2 min on an H100

1. Agreement: linear / performer / rfa, causal, T=1000 (not a multiple of the 64-token chunk), with a padded
   tail and a fully padded batch row, fp32 and bf16: the kernel path (backend="triton") and the PyTorch path ("compiled")
   vs the fp64 quadratic form (need_probs=True on CPU), output and input gradients. A check fails when the
   kernel's error exceeds 2x the PyTorch path's plus 1e-4 (fp32) / 1e-3 (bf16) of the largest true value.
   Exit code 1 on any failure.
2. Launch settings: fwd and fwd+bwd at T=65536 (B=1, H=16, D=64, bf16) for num_warps x num_stages (and
   value columns per program of the sequential passes), and the PyTorch path for reference (OUT/tune.json).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

import attnlab
from attnlab.bench.harness import bench_one
from attnlab.ops import linear_triton as _linear_triton

METHODS = {"linear": {}, "performer": {}, "rfa": {}}


def _grads(m, q, k, v, kpm, need_probs=False):
    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = m(q, k, v, causal=True, key_padding_mask=kpm, need_probs=need_probs)[0]
    w = torch.linspace(-1, 1, out.numel(), dtype=torch.float64).reshape(out.shape).to(out.device, out.dtype)
    (out * w).sum().backward()
    return [x.detach().double().cpu() for x in (out, q.grad, k.grad, v.grad)]


def agreement() -> int:
    b, h, t, d = 2, 4, 1000, 64
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(b, h, t, d, generator=g, dtype=torch.float64) for _ in range(3)]
    kpm = torch.ones(b, t, dtype=torch.bool)
    kpm[0, 900:] = False
    kpm[1] = False  # no real key: zeros and finite gradients
    failures = 0
    for name, opts in METHODS.items():
        std = 0.5 if name == "rfa" else 1.0  # rfa's trig normaliser cancels at std 1 (as in its tests)
        q64, k64, v64 = base[0] * std, base[1] * std, base[2]
        m = attnlab.make(name, head_dim=d, num_heads=h, backend="triton", **opts)
        truth = _grads(m.double(), q64, k64, v64, kpm, need_probs=True)
        m = m.float().cuda()
        m_torch = attnlab.make(name, head_dim=d, num_heads=h, backend="compiled", **opts).cuda()  # the PyTorch path
        for dtype in (torch.float32, torch.bfloat16):
            ins = [x.to("cuda", dtype) for x in (q64, k64, v64)]
            kern = _grads(m, *ins, kpm.cuda())
            ref = _grads(m_torch, *ins, kpm.cuda())
            rel = 1e-4 if dtype == torch.float32 else 1e-3
            errs = []
            ok = all(torch.isfinite(x).all() for x in kern) and (kern[0][1] == 0).all().item()
            for what, a, r, tr in zip(("out", "dq", "dk", "dv"), kern, ref, truth):
                scale = tr.abs().max().item()
                ea, er = (a - tr).abs().max().item() / scale, (r - tr).abs().max().item() / scale
                errs.append(f"{what} {ea:.1e} (torch {er:.1e})")
                ok &= ea <= 2 * er + rel
            failures += not ok
            print(f"{'ok ' if ok else 'FAIL'} {name:9} {str(dtype):14} rel. max err vs fp64: " + ", ".join(errs), flush=True)
    return failures


def timing(out_dir: str, t: int) -> None:
    """Greedy, one kernel kind at a time (the others at their current setting): the two sequential state
    passes (warps, stages, value columns per program), then the parallel output and gradient kernels."""
    dev, dt, h, d = "cuda", torch.bfloat16, 16, 64
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, h, t, d, device=dev, dtype=dt, generator=g) for _ in range(3))
    rows = []
    grid = {
        "state": [(4, 2, 64), (4, 3, 64), (4, 2, 32), (4, 3, 32), (2, 3, 32), (2, 3, 16), (8, 3, 64)],
        "out": [(4, 2, None), (4, 3, None), (8, 2, None), (8, 3, None)],
        "grad": [(4, 2, None), (4, 3, None), (8, 2, None), (8, 3, None)],
    }
    for name in ("linear", "performer"):
        m = attnlab.make(name, head_dim=d, num_heads=h, backend="triton").to(dev)
        m_torch = attnlab.make(name, head_dim=d, num_heads=h, backend="compiled").to(dev)
        call = lambda a, b, c: m(a, b, c, causal=True)  # noqa: E731
        for mode in ("fwd", "fwd+bwd"):
            r = bench_one(lambda a, b, c: m_torch(a, b, c, causal=True), lambda: (q, k, v), mode, dev, repeats=10, warmup=3)
            rows.append(dict(method=name, mode=mode, seq_len=t, setting="pytorch path", status=r["status"], ms=r["ms"],
                             peak_mem_bytes=r.get("peak_mem_bytes")))
            print(json.dumps(rows[-1]), flush=True)
        for kind, settings in grid.items():
            mode = "fwd+bwd" if kind == "grad" else "fwd"
            timed = []
            for warps, stages, bv in settings:
                _linear_triton.CONFIG[kind] = dict(num_warps=warps, num_stages=stages)
                if bv is not None:
                    _linear_triton.STATE_BV = bv
                r = bench_one(call, lambda: (q, k, v), mode, dev, repeats=10, warmup=3)
                label = f"{kind}: warps={warps} stages={stages}" + (f" value_cols={bv}" if bv else "")
                rows.append(dict(method=name, mode=mode, seq_len=t, setting=label, status=r["status"], ms=r["ms"],
                                 peak_mem_bytes=r.get("peak_mem_bytes")))
                print(json.dumps(rows[-1]), flush=True)
                if r["status"] == "ok":
                    timed.append((r["ms"], warps, stages, bv))
            ms, warps, stages, bv = min(timed)
            _linear_triton.CONFIG[kind] = dict(num_warps=warps, num_stages=stages)
            if bv is not None:
                _linear_triton.STATE_BV = bv
            print(f"best {name} {kind}: warps={warps} stages={stages} value_cols={bv}: {ms:.3f} ms ({mode})", flush=True)
        for mode in ("fwd", "fwd+bwd"):
            r = bench_one(call, lambda: (q, k, v), mode, dev, repeats=10, warmup=3)
            rows.append(dict(method=name, mode=mode, seq_len=t, setting=f"best: {_linear_triton.CONFIG} "
                             f"value_cols={_linear_triton.STATE_BV}", status=r["status"], ms=r["ms"],
                             peak_mem_bytes=r.get("peak_mem_bytes")))
            print(json.dumps(rows[-1]), flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype="bf16", heads=h, head_dim=d, batch=1,
                command="PYTHONPATH=src python benchmarks/tune_triton.py")
    json.dump([{**meta, **r} for r in rows], open(f"{out_dir}/tune.json", "w"), indent=1)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/triton")
    ap.add_argument("--t", type=int, default=65536)
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    failures = agreement()
    print(f"{failures} agreement failure(s) on {torch.cuda.get_device_name()}", flush=True)
    if not args.no_timing:
        timing(args.out, args.t)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
