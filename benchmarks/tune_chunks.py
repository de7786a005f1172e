"""Chunk size of the causal kernelised methods on the GPU, and where their time goes.

    PYTHONPATH=src python benchmarks/tune_chunks.py --out benchmarks/results/tune   # ~2 min on an H100

For linear / performer / rfa (causal, bf16, B=1, H=16, D=64, T=65536): median fwd and fwd+bwd time and peak
memory for chunk_size 32..256 (JSON rows), then a torch.profiler table of the top CUDA kernels of one
fwd+bwd call at the default chunk size (text), so the next optimisation starts from measurements.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

import attnlab
from attnlab.bench.harness import bench_one


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/tune")
    ap.add_argument("--t", type=int, default=65536)
    ap.add_argument("--methods", default="linear,performer,rfa")
    ap.add_argument("--chunks", default="32,64,128,256")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev, dt, h, d, t = "cuda", torch.bfloat16, 16, 64, args.t
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(1, h, t, d, device=dev, dtype=dt, generator=g) for _ in range(3))
    rows = []
    for name in args.methods.split(","):
        for chunk in map(int, args.chunks.split(",")):
            m = attnlab.make(name, head_dim=d, num_heads=h, chunk_size=chunk).to(dev)
            for mode in ("fwd", "fwd+bwd"):
                # the sweep's own timing: warm-up, CUDA events, median, peak memory, OOM as a row
                r = bench_one(lambda a, b, c: m(a, b, c, causal=True), lambda: (q, k, v), mode, dev, repeats=7, warmup=2)
                row = dict(method=name, chunk_size=chunk, mode=mode, seq_len=t, status=r["status"], ms=r["ms"],
                           peak_mem_bytes=r.get("peak_mem_bytes"))
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, dtype="bf16", heads=h, head_dim=d, batch=1)
    json.dump([{**meta, **r} for r in rows], open(f"{args.out}/chunks.json", "w"), indent=1)
    from torch.profiler import ProfilerActivity, profile

    with open(f"{args.out}/profile.txt", "w") as f:
        for name in args.methods.split(","):
            m = attnlab.make(name, head_dim=d, num_heads=h).to(dev)
            qq, kk, vv = (x.detach().requires_grad_(True) for x in (q, k, v))
            m(qq, kk, vv, causal=True)[0].sum().backward()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                m(qq, kk, vv, causal=True)[0].sum().backward()
                torch.cuda.synchronize()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)
            f.write(f"== {name} causal fwd+bwd T={t} (default chunk)\n{table}\n")
            print(f"== {name}\n{table}", flush=True)


if __name__ == "__main__":
    main()
