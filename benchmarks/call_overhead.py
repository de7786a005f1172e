"""Per-call host cost of attnlab's methods against the raw call they wrap, at SmolLM2's attention shapes (batch 1,
9 query heads, 3 kv heads, head dim 64, causal, forward under no_grad): how much of a swapped layer's eager time
is the wrapper (request check, GQA, pattern lookup, compiled-function entry) rather than the kernel.

    PYTHONPATH=src python benchmarks/call_overhead.py --out OUT [--lengths 1024,8192] [--calls 200]

Per (method, length): `host_us` is the host time to issue one call (a loop of --calls calls without a sync, divided
by their number; the device runs behind it), `total_us` the loop with its final sync (the call's cost when the host
keeps ahead: the device time then), for attnlab's module and for the raw call it wraps with the same inputs:
F.scaled_dot_product_attention (enable_gqa), compiled flex_attention with the method's own BlockMask, the window
Triton kernel, the linear Triton kernel on the method's own features; and the linear and FAVOR+ feature maps alone,
compiled (`impl` attnlab) against eager (`impl` raw). Rows alternate attnlab and raw, repeated
--rounds times, median kept. CUDA; on CPU a dry run (host and device are the same there).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import attnlab
from attnlab.methods.base import repeat_kv
from attnlab.ops import sparse as sparse_ops

HERE = Path(__file__).parent
H, HKV, D = 9, 3, 64


def loop(fn, calls: int, sync) -> tuple[float, float]:
    sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    sync()
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e6, (t2 - t0) / calls * 1e6


def cases(n: int, device):
    """(method, attnlab call, raw call) at length n."""
    from model_bench import synthetic_pattern

    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    q = torch.randn(1, H, n, D, device=device, dtype=dt, generator=g)
    k = torch.randn(1, HKV, n, D, device=device, dtype=dt, generator=g)
    v = torch.randn(1, HKV, n, D, device=device, dtype=dt, generator=g)
    scale = D ** -0.5

    def make(name, **opts):
        return attnlab.make(name, head_dim=D, num_heads=H, num_kv_heads=HKV, **opts).to(device)

    sd = make("sdpa")
    yield "sdpa", lambda: sd(q, k, v, causal=True), lambda: F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    cfg = type("Cfg", (), {"num_hidden_layers": 1, "num_attention_heads": H})()
    folder = synthetic_pattern(cfg, n, Path(tempfile.mkdtemp(prefix="call_overhead_")) / "pattern")
    for name, m in (("global_sparse", make("global_sparse", pattern=str(folder), sparsity=0.9, layer=0)),
                    ("window", make("window", window=256, sinks=4))):
        kernel = sparse_ops.resolve(m.opts.backend, q, need_lse=False, need_col_sums=False, pattern=m.pattern)
        if kernel == "flex":
            bm = m.pattern.block_mask(n, n, True, device, sparse_ops.call_block_size(m.flex_block_size, device, False, n))
            kr, vr = (k, v) if device.type == "cuda" else (repeat_kv(k, H // HKV), repeat_kv(v, H // HKV))
            raw = (lambda bm=bm, kr=kr, vr=vr: sparse_ops.flex(q, kr, vr, bm, scale=scale))
        elif kernel == "triton":
            from attnlab.ops.window_triton import window_attention

            raw = (lambda: window_attention(q, k, v, window=256, sinks=4, causal=True, scale=scale))  # reads GQA itself
        else:
            raw = None
        yield name, (lambda m=m: m(q, k, v, causal=True)), raw

    if device.type == "cuda":
        from attnlab.ops.linear_triton import causal_linear

        lin = make("linear")
        fq, _ = lin.feature_map(q, scale=scale, is_query=True, compiled=True)
        fk, _ = lin.feature_map(k, scale=scale, is_query=False, compiled=True)  # the kernels read the kv heads
        # under no_grad attnlab's linear maps q and k inside the kernels ("triton+map"); raw: the kernels on features
        yield "linear", lambda: lin(q, k, v, causal=True), lambda: causal_linear(fq, fk, v)
        perf = make("performer")
        pq, _ = perf.feature_map(q, scale=scale, is_query=True, compiled=True)
        pk, lk = perf.feature_map(k, scale=scale, is_query=False, compiled=True)
        yield "performer", lambda: perf(q, k, v, causal=True), lambda: causal_linear(pq, pk, v, lk)
        # the feature maps alone: compiled (elu+1: one fused kernel behind torch.compile's entry; FAVOR+ on bf16: its
        # Triton kernel) vs eager (one launch per op)
        for name, fm in (("elu_map", lin.feature_map), ("favor_map", perf.feature_map)):
            yield (f"{name} compiled|eager", (lambda fm=fm: fm(q, scale=scale, is_query=False, compiled=True)),
                   (lambda fm=fm: fm(q, scale=scale, is_query=False, compiled=False)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,8192")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(HERE))
    device = torch.device(a.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    with torch.no_grad():
        for n in (int(x) for x in a.lengths.split(",")):
            for name, ours, raw in cases(n, device):
                fns = {"attnlab": ours, **({"raw": raw} if raw is not None else {})}
                for fn in fns.values():  # compile, build, warm
                    for _ in range(3):
                        fn()
                got = {k: [] for k in fns}
                for _ in range(a.rounds):
                    for impl, fn in fns.items():
                        got[impl].append(loop(fn, a.calls, sync))
                for impl, res in got.items():
                    row = {"method": name, "impl": impl, "seq_len": n, "host_us": statistics.median(r[0] for r in res),
                           "total_us": statistics.median(r[1] for r in res), "calls": a.calls, "rounds": a.rounds}
                    rows.append(row)
                    print(f"{name:>14} {impl:>8} {n:>6}  host {row['host_us']:8.1f} us/call  total {row['total_us']:8.1f} "
                          "us/call", flush=True)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
           "command": "python " + " ".join(sys.argv), "heads": H, "kv_heads": HKV, "head_dim": D}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "call_overhead.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
