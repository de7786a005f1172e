"""The sliding-window Triton kernel (`ops/window_triton.py`) on the GPU: tile settings, and how far it is from
causal flash, from FlexAttention with the same band and from the H200's own matmul rate.

    PYTHONPATH=src python3 benchmarks/tune_window.py --out $OUT/window     # ~3 min on an H200

For each length (default 4096, 16384, 65536), B=1, H=16, D=64, bf16, window 256 (+ 4 sinks where asked),
causal and not, fwd and fwd+bwd: attnlab window backend="triton" at every tile setting of GRID and every band mask
(`window_triton.BAND_MODES`: the whole rule on every tile, or two bounds a row), backend="flex",
raw compiled flex_attention with the window's BlockMask, and SDPA flash (causal: the dense causal baseline
the 30x goal is measured against). Also measured in the same process (`attnlab.bench.harness.ceilings`): the
bf16 matmul rate (8192^3 torch.mm) and the copy bandwidth (1 GiB), the ceilings of each row's fractions. A row's
FLOPs count the band's visible (query, key) pairs (4 * pairs * D forward, 2.5x that for the backward:
FlashAttention-2's dq, dk, dv and the recomputed scores), not the dense equivalent.
Writes OUT/tune_window.json (rows), printing a table.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch
import triton
import triton.testing

import attnlab
from attnlab.ops import sparse as sparse_ops
from attnlab.ops import window_triton

GRID = {"fwd": [dict(BM=64, BN=64, num_warps=4, num_stages=3), dict(BM=64, BN=64, num_warps=4, num_stages=4),
                dict(BM=128, BN=64, num_warps=4, num_stages=3), dict(BM=128, BN=64, num_warps=8, num_stages=3),
                # register caps (Triton's maxnreg; the first entry above is uncapped): at 144-157 registers a thread,
                # 3 blocks fit an SM (ncu on the H200, benchmarks/results/window/h200_ncu/); at 128, 4 (their shared
                # memory fits 4 at 3 stages, 5 at 2); 96 untimed
                dict(BM=64, BN=64, num_warps=4, num_stages=3, maxnreg=128),
                dict(BM=64, BN=64, num_warps=4, num_stages=2, maxnreg=128),
                dict(BM=64, BN=64, num_warps=4, num_stages=2, maxnreg=96)],  # 5 blocks an SM, if it does not spill
        "bwd": [dict(BM=64, BN=64, num_warps=4, num_stages=2), dict(BM=32, BN=64, num_warps=4, num_stages=2),
                dict(BM=64, BN=64, num_warps=8, num_stages=3),
                dict(BM=64, BN=64, num_warps=4, num_stages=2, maxnreg=168),  # register caps, as the forward's
                dict(BM=64, BN=64, num_warps=4, num_stages=2, maxnreg=128)]}
# (the grid before the band modes, 2026-12-02: fwd also BM=128/BN=128/8 warps/2 stages and BM=128/BN=32/4/4, bwd
# BM=64/BN=128/8/2 and BM=32/BN=128/4/2: never the fastest, benchmarks/results/window/h200/tune.txt)


def timed(fn, mode, q, k, v):
    if mode == "fwd":
        with torch.no_grad():
            return triton.testing.do_bench(lambda: fn(q, k, v), warmup=10, rep=100)
    q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
    g = torch.randn_like(q)

    def step():
        fn(q, k, v).backward(g)
    return triton.testing.do_bench(step, warmup=5, rep=100, grad_to_none=[q, k, v])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="4096,16384,65536")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=0)
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--no-grid", action="store_true", help="only the committed CONFIG, no tile search")
    p.add_argument("--bands", default=",".join(window_triton.BAND_MODES),
                   help="the kernels' band masks to time at each tile setting (window_triton.BAND_MODES)")
    p.add_argument("--sink-chunks", default="",
                   help="comma list of window_triton.SINK_CHUNK_TILES values to time each setting with (with "
                        "--sinks: 100000 makes one chunk, so each sink tile's own program walks every query, the "
                        "kernel before chunks)")
    p.add_argument("--bwd-launches", default="",
                   help="comma list of window_triton.BWD_LAUNCHES values (one, two, streams) to time each fwd+bwd "
                        "setting with (default: the rule's)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    bad = [b for b in args.bands.split(",") if b not in window_triton.BAND_MODES]
    if bad:
        p.error(f"--bands: {', '.join(bad)} not among {', '.join(window_triton.BAND_MODES)}")
    if not set(x for x in args.bwd_launches.split(",") if x) <= {"one", "two", "streams"}:
        p.error(f"--bwd-launches: one, two and / or streams, got {args.bwd_launches!r}")
    if not all(x.isdigit() and int(x) > 0 for x in args.sink_chunks.split(",") if x):
        p.error(f"--sink-chunks: positive integers, got {args.sink_chunks!r}")
    if not torch.cuda.is_available():
        sys.exit("error: tune_window.py times the kernels on a CUDA GPU; none is available here")
    from pathlib import Path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from attnlab.ops.fused import raise_recompile_limit

    raise_recompile_limit()
    from attnlab.bench.harness import ceilings

    c = ceilings("cuda")
    if not c:
        sys.exit("error: the GPU's matmul and copy ceilings could not be measured (needs CUDA and triton)")
    ceil = {"matmul_tflops": c["ceiling_matmul_tflops"], "hbm_gbps": c["ceiling_copy_gbps"]}
    print(f"ceilings: bf16 matmul {ceil['matmul_tflops']:.0f} TFLOP/s, copy {ceil['hbm_gbps']:.0f} GB/s", flush=True)
    base_cfg, base_band, base_chunks = dict(window_triton.CONFIG), window_triton.BAND, window_triton.SINK_CHUNK_TILES
    base_launches = window_triton.BWD_LAUNCHES
    try:
        return _sweep(args, out, ceil, base_cfg)
    finally:
        window_triton.CONFIG.update(base_cfg)
        window_triton.BAND = base_band
        window_triton.SINK_CHUNK_TILES = base_chunks
        window_triton.BWD_LAUNCHES = base_launches


def _sweep(args, out, ceil, base_cfg) -> int:
    """Every row of the search, written to OUT/tune_window.json as it comes."""
    from attnlab.patterns import WindowPattern

    rows = []
    h, d, w, s = 16, 64, args.window, args.sinks
    for t, causal, mode in itertools.product([int(x) for x in args.lengths.split(",")], (True, False),
                                             args.modes.split(",")):
        g = torch.Generator(device="cuda").manual_seed(t)
        q, k, v = (torch.randn(1, h, t, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
        pairs = WindowPattern(w, s).visible_pairs(t, t, causal) * h
        flops = 4 * pairs * d * (1 if mode == "fwd" else 3.5)
        bytes_moved = 4 * q.numel() * 2 * (1 if mode == "fwd" else 2.5)  # q, k, v, out once (bwd: + do, dq, dk, dv)
        impls = {}
        wm = attnlab.make("window", head_dim=d, num_heads=h, window=w, sinks=s, backend="flex").cuda()
        impls["attnlab flex"] = lambda q, k, v: wm(q, k, v, causal=causal).out
        bm = wm.pattern.block_mask(t, t, causal, "cuda", 128)
        flex = sparse_ops.compiled_flex_attention("cuda")
        impls["raw flex_attention"] = lambda q, k, v: flex(q, k, v, block_mask=bm)
        if causal:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            def flash(q, k, v):
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            impls["sdpa flash (dense causal)"] = flash
        tm = attnlab.make("window", head_dim=d, num_heads=h, window=w, sinks=s, backend="triton").cuda()
        tri = lambda q, k, v: tm(q, k, v, causal=causal).out  # noqa: E731
        stage = "fwd" if mode == "fwd" else "bwd"
        grid = [None] if args.no_grid else GRID[stage]
        chunks = [int(x) for x in args.sink_chunks.split(",") if x] or [window_triton.SINK_CHUNK_TILES]
        launches = [x for x in args.bwd_launches.split(",") if x and mode != "fwd"] or [window_triton.BWD_LAUNCHES]
        for cfg, band, chunk, bl in itertools.product(grid, args.bands.split(","), chunks, launches):
            # each tile setting as a whole CONFIG, installed with the band mode just before its row is timed
            full = dict(base_cfg)
            if cfg is not None and stage == "fwd":
                full["fwd"] = cfg
            elif cfg is not None:  # dq's tiles the dk, dv programs' swapped; one launch's settings for both
                full.update(dkdv=dict(BM=cfg["BM"], BN=cfg["BN"]), dq=dict(BM=cfg["BN"], BN=cfg["BM"]),
                            bwd={k: v for k, v in cfg.items() if k not in ("BM", "BN")})
            label = f" sink_chunk_tiles={chunk}" if args.sink_chunks else ""
            label += f" bwd={bl}" if args.bwd_launches and mode != "fwd" else ""
            impls[f"attnlab triton {band} {json.dumps(cfg) if cfg else 'CONFIG'}{label}"] = (tri, full, band, chunk, bl)
        for name, fn in impls.items():
            cfg = band = chunk = bl = None
            if isinstance(fn, tuple):
                fn, cfg, band, chunk, bl = fn
                window_triton.CONFIG.update(cfg)
                window_triton.BAND = band
                window_triton.SINK_CHUNK_TILES = chunk
                window_triton.BWD_LAUNCHES = bl
            t0 = time.perf_counter()
            try:
                ms = timed(fn, mode, q, k, v)
                err = None
            except Exception as e:  # noqa: BLE001 - a row, not a crash
                ms, err = None, f"{type(e).__name__}: {str(e)[:200]}"
            row = {"impl": name, "seq_len": t, "causal": causal, "mode": mode, "window": w, "sinks": s, "heads": h,
                   "head_dim": d, "batch": 1, "dtype": "bfloat16", "ms": ms, "error": err, "config": cfg, "band": band,
                   "sink_chunk_tiles": chunk, "bwd_launches": bl,
                   "flops": flops, "bytes_moved": bytes_moved, "device_name": torch.cuda.get_device_name(),
                   "torch_version": torch.__version__, "triton_version": triton.__version__, **ceil,
                   "wall_s": round(time.perf_counter() - t0, 1), "command": " ".join(sys.argv)}
            if ms:
                row["tflops"] = flops / ms / 1e9
                row["matmul_fraction"] = row["tflops"] / ceil["matmul_tflops"]
                row["hbm_fraction"] = bytes_moved / ms / 1e6 / ceil["hbm_gbps"]
            rows.append(row)
            (out / "tune_window.json").write_text(json.dumps(rows, indent=1))
            print(f"T={t:6} causal={causal!s:5} {mode:7} {name:100} "
                  + (f"{ms:8.3f} ms {row['tflops']:6.0f} TFLOP/s ({row['matmul_fraction']:.0%} of matmul)" if ms else err),
                  flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
