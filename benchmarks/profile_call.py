"""Where one attention call's device time goes: torch.profiler over a few warmed-up calls of one method.

    PYTHONPATH=src python benchmarks/profile_call.py lsh --t 65536 --mode fwd+bwd [--option backend=compiled]
    PYTHONPATH=src python benchmarks/profile_call.py window --t 4096 --causal --mode fwd+bwd --host
    PYTHONPATH=src python benchmarks/profile_call.py performer --t 1024 --heads 9 --kv-heads 3 --causal --mode fwd+bwd
    PYTHONPATH=src python benchmarks/profile_call.py performer --t 1024 --heads 9 --kv-heads 3 --causal --mode fwd+bwd \
        --hf-layout   # q, k, v and the output in transformers' layout, as a swapped SmolLM2 layer sees them
    PYTHONPATH=src ncu --clock-control none -k regex:_state_kernel --section WarpStateStats \
        python benchmarks/profile_call.py performer --t 1024 --causal --plain --calls 1   # under Nsight Compute

bf16, batch 1, 16 heads, head dim 64 (the bench's long-length shape) unless told otherwise. Prints the CUDA
kernels by total time (per call), the device time per call and the call's wall time, and writes the table as JSON
with --out. --host: where the host's time goes instead (what a call costs when the device waits on it): the host
time per call issued without a sync (median of 5 loops of --calls), and cProfile's functions by own time per call.
"""
from __future__ import annotations

import argparse
import ast
import cProfile
import importlib
import json
import pstats
import statistics
import sys
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
    p.add_argument("--kv-heads", type=int, default=None, help="grouped-query attention: kv heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--hf-layout", action="store_true",
                   help="q, k, v as transformers hands them over (views of one [B, T, (H + 2 Hkv) D] projection) and the "
                        "output through the adapter's transpose(1, 2).contiguous(), as benchmarks/short_calls.py")
    p.add_argument("--option", action="append", default=[], help="NAME=VALUE, repeatable (the method's options)")
    p.add_argument("--calls", type=int, default=5, help="profiled calls (after 3 warm-up calls)")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--host", action="store_true", help="profile the host (cProfile) instead of the device")
    p.add_argument("--plain", action="store_true", help="only run --calls calls after the warm-up, unprofiled: for a "
                                                        "profiler outside (Nsight Compute: `ncu ... python "
                                                        "benchmarks/profile_call.py ... --plain --calls 1`)")
    p.add_argument("--set", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="set an `attnlab.ops` module attribute first (a Python literal), e.g. "
                        "linear_triton.SEGMENT_LEN=2 (repeatable)")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    args = p.parse_args(argv)
    if args.plain and (args.host or args.out):
        p.error("--plain runs the calls only: it takes neither --host nor --out")
    for spec in args.set:
        try:
            target, value = spec.split("=", 1)
            mod, name = target.rsplit(".", 1)
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError):
            p.error(f"--set: MODULE.NAME=VALUE with a Python literal value, got {spec!r}")
        try:
            module = importlib.import_module(f"attnlab.ops.{mod}")
        except ModuleNotFoundError as e:
            p.error(f"--set {spec!r}: {e}")
        if not hasattr(module, name):
            p.error(f"--set {spec!r}: attnlab.ops.{mod} has no {name}")
        setattr(module, name, value)
    if not torch.cuda.is_available():
        print("profile_call.py: needs a CUDA device", file=sys.stderr)
        return 1
    opts = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.option)}
    cls = attnlab.registry.get(args.method)
    opts = {**cls.defaults(args.t), **opts}
    hkv = args.kv_heads or args.heads
    m = attnlab.make(args.method, head_dim=args.head_dim, num_heads=args.heads, num_kv_heads=hkv, **opts).cuda()
    g = torch.Generator(device="cuda").manual_seed(0)
    grad = args.mode == "fwd+bwd"
    heads = (args.heads, hkv, hkv)
    if args.hf_layout:
        row = torch.randn(args.batch, args.t, sum(heads) * args.head_dim, device="cuda", dtype=torch.bfloat16,
                          generator=g)
        q, k, v = (x.unflatten(-1, (-1, args.head_dim)).transpose(1, 2).detach()
                   for x in row.split([h * args.head_dim for h in heads], dim=-1))
    else:
        q, k, v = (torch.randn(args.batch, h, args.t, args.head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
                   for h in heads)
    for x in (q, k, v):
        x.requires_grad_(grad)

    def call():
        with torch.set_grad_enabled(grad):
            out = m(q, k, v, causal=args.causal).out
            if args.hf_layout:
                out = out.transpose(1, 2).contiguous()
            if grad:  # gradients returned, not accumulated into .grad (no accumulation kernels in the profile)
                torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    if args.host:
        return _host(args, opts, m, call)
    if args.plain:
        for _ in range(args.calls):
            call()
        torch.cuda.synchronize()
        return 0
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
                       "causal": args.causal, "heads": args.heads, "kv_heads": hkv, "hf_layout": args.hf_layout,
                       "device_ms": total, "wall_ms": wall, "kernels": rows,
                       "device": torch.cuda.get_device_name()}, f, indent=1)
    return 0


def _host(args, opts, m, call) -> int:
    """The host's cost of a call: loops of --calls calls with no sync inside (the device runs behind), then cProfile's
    functions by own time (tottime) per call."""
    loops = []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.calls):
            call()
        loops.append((time.perf_counter() - t0) / args.calls * 1e6)
        torch.cuda.synchronize()
    host_us = statistics.median(loops)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        call()
    prof.disable()
    torch.cuda.synchronize()
    st = pstats.Stats(prof)
    rows = []
    for (path, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items():
        rows.append({"function": f"{path.rsplit('/', 2)[-1] if '/' in path else path}:{line}({name})",
                     "own_us_per_call": tt / args.calls * 1e6, "cum_us_per_call": ct / args.calls * 1e6,
                     "calls_per_call": nc / args.calls})
    rows.sort(key=lambda r: -r["own_us_per_call"])
    print(f"{args.method} {opts} kernel={m.kernel} T={args.t} {args.mode} causal={args.causal}: host {host_us:.0f} us "
          f"per call (loops of {args.calls}: {', '.join(f'{x:.0f}' for x in loops)}); by own time under cProfile:")
    for r in rows[:args.top]:
        print(f"  {r['own_us_per_call']:8.1f} us own {r['cum_us_per_call']:8.1f} cum {r['calls_per_call']:5.1f}x  "
              f"{r['function'][:100]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"method": args.method, "options": opts, "kernel": m.kernel, "t": args.t, "mode": args.mode,
                       "causal": args.causal, "heads": args.heads, "kv_heads": args.kv_heads or args.heads,
                       "hf_layout": args.hf_layout, "host_us": host_us, "host_loops_us": loops, "functions": rows[:60],
                       "device": torch.cuda.get_device_name()}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
