"""The learned mask's inference kernel (its layout as a FlexAttention BlockMask) against a sliding window + 4 sinks
of the same token density, timed back to back in one run with the bench harness (causal fwd and fwd+bwd).

    PYTHONPATH=src python benchmarks/learned_mask_speed.py --out $OUT     # CUDA, bf16, 16 heads, head dim 64

The learned layout here is the untrained (window-initialised) one at the target density: speed depends on which
blocks are kept, and a trained layout of the same density keeps the same number of blocks. `--whole-mod` adds a row
per cell, "learned_mask@whole-mod": the same layout with compiled FlexAttention evaluating the pattern's whole
mask_mod inside the BlockMask's partial blocks (as before `UnionPattern.partial_mask_mod`: a gather from the
per-head layout table on every pair there) instead of the band, sinks and causal alone. Writes
OUT/learned_mask_speed.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnlab
from attnlab.bench.harness import bench_one
from attnlab.cli.common import environment
from attnlab.patterns import WindowPattern


def main() -> None:
    from attnlab.ops.fused import raise_recompile_limit

    raise_recompile_limit()  # flex variants per (shape, pattern, grad mode): past dynamo's default 8 it runs eagerly
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/lm_speed")
    p.add_argument("--lengths", default="4096,16384,65536")
    p.add_argument("--densities", default="0.5,0.25")
    p.add_argument("--device", default="cuda")
    p.add_argument("--block-size", type=int, default=128, help="the learned blocks (run on FlexAttention: "
                   "backend='flex', which 16-64-token blocks would otherwise leave for the Triton block kernels)")
    p.add_argument("--whole-mod", action="store_true", help="also time the layout with the whole mask_mod in partial "
                   "blocks (learned_mask@whole-mod rows), in the same run")
    args = p.parse_args()
    bs = args.block_size
    dev, dt, h, d = args.device, torch.bfloat16, 16, 64
    rows = []
    for t in map(int, args.lengths.split(",")):
        for density in map(float, args.densities.split(",")):
            opts = dict(density=density, block_size=bs, max_blocks=-(-t // bs), backend="flex")
            lm = attnlab.make("learned_mask", head_dim=d, num_heads=h, **opts).to(dev).eval()
            real = lm.density_at(t)
            variants, patched = [("learned_mask", lm)], None
            if args.whole_mod:
                whole = attnlab.make("learned_mask", head_dim=d, num_heads=h, **opts).to(dev).eval()
                patched = whole._pattern(-(-t // bs), True)  # kept while its scores do not change (eval)
                patched.partial_mask_mod = lambda *a, **kw: None  # the whole mask_mod
                variants.append(("learned_mask@whole-mod", whole))
            pat = WindowPattern.for_density(real, t, sinks=4)
            win = attnlab.make("window", head_dim=d, num_heads=h, window=pat.window, sinks=4).to(dev)
            g = torch.Generator(device=dev).manual_seed(t)
            make = lambda: tuple(torch.randn(1, h, t, d, generator=g, device=dev, dtype=dt) for _ in range(3))  # noqa: E731
            for mode in ("fwd", "fwd+bwd"):
                for name, m in (*variants, ("window", win)):
                    if mode == "fwd+bwd" and name.startswith("learned_mask"):
                        m.eval()  # inference kernel (the hard mask) also for the backward: training uses ops.gated
                    r = bench_one(lambda q, k, v, m=m: m(q, k, v, causal=True).out, make, mode, dev, repeats=10, warmup=3)
                    rows.append({"method": name, "seq_len": t, "mode": mode, "target_density": density,
                                 "density": real if name.startswith("learned_mask") else pat.density(t, t, causal=True),
                                 "options": m.options_dict(), "kernel": m.kernel, **{k: r[k] for k in ("status", "ms", "peak_mem_bytes", "error")},
                                 **environment(dev), "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")})
                    print(json.dumps({k: rows[-1][k] for k in ("method", "seq_len", "mode", "target_density", "density", "kernel", "status", "ms")}), flush=True)
            if patched is not None:
                assert whole._pattern(-(-t // bs), True) is patched, "the whole-mod rows lost their patched pattern"
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "learned_mask_speed.json").write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
