"""Where one attention call's device time goes: torch.profiler over a few warmed-up calls of one method.

    PYTHONPATH=src python benchmarks/profile_call.py lsh --t 65536 --mode fwd+bwd [--option backend=compiled]

bf16, batch 1, 16 heads, head dim 64 (the bench's long-length shape) unless told otherwise. Prints the CUDA
kernels by total time (per call), the device time per call and the call's wall time, and writes the table as JSON
with --out.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import attnlab
from attnlab.cli.common import parse_value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method")
    p.add_argument("--t", type=int, default=65536)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--option", action="append", default=[], help="NAME=VALUE, repeatable (the method's options)")
    p.add_argument("--calls", type=int, default=5, help="profiled calls (after 3 warm-up calls)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    opts = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.option)}
    cls = attnlab.registry.get(args.method)
    opts = {**cls.defaults(args.t), **opts}
    m = attnlab.make(args.method, head_dim=args.head_dim, num_heads=args.heads, **opts).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.batch, args.heads, args.t, args.head_dim)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    grad = args.mode == "fwd+bwd"
    for x in (q, k, v):
        x.requires_grad_(grad)

    def call():
        with torch.set_grad_enabled(grad):
            out = m(q, k, v, causal=args.causal).out
            if grad:
                out.backward(torch.ones_like(out))

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            call()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / args.calls * 1e3
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0 and e.key and not e.key.startswith("ProfilerStep"):
            rows.append({"kernel": e.key, "ms_per_call": us / 1e3 / args.calls, "launches_per_call": e.count / args.calls})
    rows = [r for r in rows if not r["kernel"].startswith("aten::")] or rows
    rows.sort(key=lambda r: -r["ms_per_call"])
    total = sum(r["ms_per_call"] for r in rows)
    print(f"{args.method} {opts} kernel={m.kernel} T={args.t} {args.mode} causal={args.causal}: device {total:.2f} ms "
          f"per call, wall {wall:.2f} ms (under the profiler)")
    for r in rows[:args.top]:
        print(f"  {r['ms_per_call']:8.3f} ms  {r['launches_per_call']:5.1f}x  {r['kernel'][:110]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"method": args.method, "options": opts, "kernel": m.kernel, "t": args.t, "mode": args.mode,
                       "causal": args.causal, "device_ms": total, "wall_ms": wall, "kernels": rows,
                       "device": torch.cuda.get_device_name()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
