"""Where a Nystrom call's time goes when the device is not the bottleneck: host time to issue one call against the
call with its sync, for nystrom's two backends and two forms of its Newton-Schulz pinv (the paper's 4-D matmuls
with autograd's backward, `paper`, against `methods.nystrom._NewtonSchulz`, `bmm`), forward and forward+backward.

    PYTHONPATH=src python benchmarks/nystrom_host.py --out OUT.json [--calls 50] [--rounds 5]

bf16, 16 heads, head dim 64, 64 landmarks; batch 4 at 4096 tokens and 1 at 65536 (the bench's shapes). Per case:
`host_us` the loop of --calls calls without a sync divided by their number, `total_us` with the final sync; cases
alternate, repeated --rounds times, median kept. CUDA only. The Triton path's forward without autograd runs the pinv
inside `ops.nystrom_triton.solve`, so its two pinv forms time the same code there (their spread is the noise).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import attnlab
from attnlab.methods import nystrom as nys
from call_overhead import loop


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("nystrom_host.py times CUDA calls; no CUDA device here", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    forms = {"bmm": nys.iterative_pinv, "paper": nys.paper_pinv}
    results = {}
    for b, t in ((4, 4096), (1, 65536)):
        g = torch.Generator(device=dev).manual_seed(0)
        q, k, v = (torch.randn(b, 16, t, 64, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_(True)
                   for _ in range(3))
        cases = {}
        for backend in ("triton", "torch"):
            m = attnlab.make("nystrom", head_dim=64, num_heads=16, num_landmarks=64, backend=backend).to(dev)
            for form in forms:
                def fwd(m=m, form=form):
                    nys.iterative_pinv = forms[form]
                    with torch.no_grad():
                        m(q, k, v)

                def fwd_bwd(m=m, form=form):
                    nys.iterative_pinv = forms[form]
                    m(q, k, v).out.sum().backward()

                cases[(backend, form, "fwd")] = fwd
                cases[(backend, form, "fwd+bwd")] = fwd_bwd
        for fn in cases.values():  # warm-up: compiles, cuBLAS handles
            for _ in range(3):
                fn()
        samples = {key: [] for key in cases}
        for _ in range(args.rounds):
            for key, fn in cases.items():
                samples[key].append(loop(fn, args.calls, torch.cuda.synchronize))
        for (backend, form, mode), s in samples.items():
            host, total = (statistics.median(x[i] for x in s) for i in (0, 1))
            results[f"{backend}/{form}/{mode}/B{b}xT{t}"] = {"host_us": round(host, 1), "total_us": round(total, 1)}
            print(f"B={b} T={t:6} {backend:6} pinv={form:5} {mode:8} host {host:8.1f} us  with sync {total:8.1f} us",
                  flush=True)
        nys.iterative_pinv = forms["bmm"]
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "calls": args.calls,
            "rounds": args.rounds, "command": "python benchmarks/nystrom_host.py " + " ".join(argv or sys.argv[1:])}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
