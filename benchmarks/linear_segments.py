"""The causal linear-attention Triton kernels' state pass in segments (`ops.linear_triton.segment_len`) against the
one-segment walk it replaced, timed in the same run on the same inputs (CUDA): `causal_linear` on feature tensors
shaped like SmolLM2's layers (batch 1, 9 heads, head dim 64) and the kernel bench's (16 heads), elu-like features
(F = 64, no key log-scales: linear) and FAVOR+-like ones (F = 256 with key log-scales: performer), fwd and fwd+bwd.
Rows interleave the two variants (one timed call of each in turn, median over the rounds).

    PYTHONPATH=src python benchmarks/linear_segments.py --out OUT   # OUT/linear_segments.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from attnlab.ops import linear_triton as lt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="1024,4096,16384,65536")
    ap.add_argument("--heads", default="9,16")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    assert torch.cuda.is_available(), "CUDA only"
    dev = torch.device("cuda")
    rows = []
    for t in (int(x) for x in a.lengths.split(",")):
        for h in (int(x) for x in a.heads.split(",")):
            for kind, f, scale in (("linear", 64, False), ("performer", 256, True)):
                g = torch.Generator(device=dev).manual_seed(0)
                q = torch.rand(1, h, t, f, device=dev, generator=g, dtype=torch.bfloat16)
                k = torch.rand(1, h, t, f, device=dev, generator=g, dtype=torch.bfloat16)
                v = torch.randn(1, h, t, 64, device=dev, generator=g, dtype=torch.bfloat16)
                lk = torch.randn(1, h, t, device=dev, generator=g) if scale else None
                for mode in ("fwd", "fwd+bwd"):
                    times = {"segments": [], "one-walk": []}
                    outs = {}
                    for r in range(a.rounds + 2):
                        for variant in times:
                            lt.SEGMENT_LEN = None if variant == "segments" else 1 << 30
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
                    lt.SEGMENT_LEN = None
                    diff = max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-30))
                               for x, y in zip(outs["segments"], outs["one-walk"]))
                    ms = {v: statistics.median(ts) for v, ts in times.items()}
                    n = -(-t // lt.BT)
                    walks = -(-f // lt.BK) * -(-64 // lt.STATE_BV) * h
                    row = {"kind": kind, "seq_len": t, "heads": h, "feature_dim": f, "mode": mode, "dtype": "bfloat16",
                           "segment_len": lt.segment_len(n, walks, lt._sm_count(dev)), "chunks": n, "ms_segments": ms["segments"],
                           "ms_one_walk": ms["one-walk"], "speedup": ms["one-walk"] / ms["segments"],
                           "max_rel_diff": diff, "rounds": a.rounds}
                    rows.append(row)
                    print(f"{kind:>9} T={t:>6} H={h:>2} {mode:>7}: segments {ms['segments']:8.3f} ms, one walk "
                          f"{ms['one-walk']:8.3f} ms, x{row['speedup']:.2f} (max rel diff {diff:.1e})", flush=True)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "linear_segments.json").write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "device": torch.cuda.get_device_name(),
        "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
