"""The causal linear-attention Triton kernels' state pass in segments (`ops.linear_triton.segment_len`) against the
one-segment walk it replaced, timed in the same run on the same inputs (CUDA): `causal_linear` on feature tensors
shaped like SmolLM2's layers (batch 1, 9 heads, head dim 64) and the kernel bench's (16 heads), elu-like features
(F = 64, no key log-scales: linear) and FAVOR+-like ones (F = 256 with key log-scales: performer), fwd and fwd+bwd.
Rows interleave the two variants (one timed call of each in turn, median over the rounds).

    PYTHONPATH=src python benchmarks/linear_segments.py --out OUT   # OUT/linear_segments.json

`--compare parallel`: the forward as one quadratic pass (`_parallel_kernel`, what inputs up to
`linear_triton.parallel_max_t` tokens take; in fwd+bwd with its two-pass backward where F <= PARALLEL_BWD_MAX_F,
FAVOR+'s 256 features keep the chunked backward) against the chunked passes, at the lengths given:
OUT/linear_parallel.json, the data behind `parallel_max_t`. `--groups 3` gives the keys and
values a third of the query heads (SmolLM2's grouped-query attention).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from attnlab.ops import linear_triton as lt


def graph_ms(q, k, v, lk, backward: bool, replays: int = 20) -> float:
    """ms per call of causal_linear (and its backward) captured once as a CUDA graph and replayed back to back."""
    qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))
    gout = torch.ones(q.shape[:-1] + v.shape[-1:], device=q.device, dtype=v.dtype)

    def step():
        out = lt.causal_linear(qq, kk, vv, lk)
        if backward:
            torch.autograd.grad(out, (qq, kk, vv), gout)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (compilation, autotuning) outside the capture
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,4096,16384,65536")
    ap.add_argument("--heads", default="9,16")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--compare", choices=("segments", "parallel"), default="segments")
    ap.add_argument("--groups", type=int, default=1, help="query heads per kv head")
    ap.add_argument("--graph", action="store_true", help="also time each variant's call captured as a CUDA graph "
                    "and replayed (the device time, without the host's launches: what a graphed model step pays)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    # each comparison: {variant: (SEGMENT_LEN, PARALLEL_MAX_T)}; the first is the new form
    variants = {"segments": {"segments": (None, 0), "one-walk": (1 << 30, 0)},
                "parallel": {"parallel": (None, 1 << 30), "chunked": (None, 0)}}[a.compare]
    assert torch.cuda.is_available(), "CUDA only"
    dev = torch.device("cuda")
    rows = []
    for t in (int(x) for x in a.lengths.split(",")):
        for h in (int(x) for x in a.heads.split(",")):
            for kind, f, scale in (("linear", 64, False), ("performer", 256, True)):
                g = torch.Generator(device=dev).manual_seed(0)
                hkv = h // a.groups
                q = torch.rand(1, h, t, f, device=dev, generator=g, dtype=torch.bfloat16)
                k = torch.rand(1, hkv, t, f, device=dev, generator=g, dtype=torch.bfloat16)
                v = torch.randn(1, hkv, t, 64, device=dev, generator=g, dtype=torch.bfloat16)
                lk = torch.randn(1, hkv, t, device=dev, generator=g) if scale else None
                for mode in ("fwd", "fwd+bwd"):
                    times = {name: [] for name in variants}
                    outs = {}
                    for r in range(a.rounds + 2):
                        for variant in times:
                            lt.SEGMENT_LEN, lt.PARALLEL_MAX_T = variants[variant]
                            qq, kk, vv = (x.detach().requires_grad_(mode == "fwd+bwd") for x in (q, k, v))
                            torch.cuda.synchronize()
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            out = lt.causal_linear(qq, kk, vv, lk)
                            if mode == "fwd+bwd":
                                out.backward(torch.ones_like(out))
                            end.record()
                            torch.cuda.synchronize()
                            if r >= 2:  # two warm-up rounds (compilation)
                                times[variant].append(start.elapsed_time(end))
                            if r == 0:
                                outs[variant] = (out.detach().float(), *(x.grad.float() for x in (qq, kk, vv)
                                                                         if x.grad is not None))
                    lt.SEGMENT_LEN = lt.PARALLEL_MAX_T = None
                    new, old = variants
                    diff = max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
                               for x, y in zip(outs[new], outs[old]))
                    ms = {v: statistics.median(ts) for v, ts in times.items()}
                    if a.graph:
                        for variant in variants:
                            lt.SEGMENT_LEN, lt.PARALLEL_MAX_T = variants[variant]
                            ms["graph " + variant] = graph_ms(q, k, v, lk, mode == "fwd+bwd")
                        lt.SEGMENT_LEN = lt.PARALLEL_MAX_T = None
                    n = -(-t // lt.BT)
                    walks = lt.walk_count(f, 64, hkv)  # the states are the kv heads'
                    row = {"kind": kind, "seq_len": t, "heads": h, "kv_heads": hkv, "feature_dim": f, "mode": mode,
                           "dtype": "bfloat16", "segment_len": lt.segment_len(n, walks, lt._sm_count(dev)), "chunks": n,
                           **{"ms_" + name.replace("-", "_").replace(" ", "_"): val for name, val in ms.items()},
                           "speedup": ms[old] / ms[new], "max_rel_diff": diff, "rounds": a.rounds}
                    rows.append(row)
                    if a.graph:
                        row["graph_speedup"] = ms["graph " + old] / ms["graph " + new]
                    print(f"{kind:>9} T={t:>6} H={h:>2}/{hkv} {mode:>7}: {new} {ms[new]:8.3f} ms, {old} "
                          f"{ms[old]:8.3f} ms, x{row['speedup']:.2f} (max rel diff {diff:.1e})"
                          + (f"; graphed {ms['graph ' + new]:.3f} vs {ms['graph ' + old]:.3f} ms, "
                             f"x{row['graph_speedup']:.2f}" if a.graph else ""), flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"linear_{a.compare}.json").write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
