"""`attnlab scan`: per-layer sensitivity, one method in one layer at a time; heat map, table, JSON."""
from __future__ import annotations

import time
from pathlib import Path

from ..types import AttnlabError
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser("scan", help="per-layer sensitivity: each method in one layer at a time, held-out KL",
                       description="Swap one method into one attention layer at a time (the rest original) and "
                                   "measure the held-out KL(original || swapped) it causes: a layer x method heat map "
                                   "(PNG), a table and JSON rows. The original logits are computed once.")
    p.add_argument("--model", default="smollm2", help="a packaged causal LM (smollm2) or a local model folder")
    p.add_argument("--methods", default="window,linear,performer",
                   help="comma-separated methods, each with its defaults at --seq-len (default: %(default)s)")
    common.add_set_argument(p)
    p.add_argument("--layers", default=None, help="layer indices to scan, e.g. 0-3,10 (default: all)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per held-out window (default: %(default)s)")
    p.add_argument("--num-tokens", type=int, default=1024, help="held-out tokens (windows = num_tokens / seq_len) "
                                                               "(default: %(default)s)")
    p.add_argument("--text", default=None, help="a UTF-8 text file instead of Moby Dick's held-out tail")
    p.add_argument("--seed", type=int, default=0, help="the spec seed random methods draw per-layer seeds from")
    common.add_model_run_arguments(p, "scan", "scan.json and scan.png")
    p.set_defaults(func=run)


def parse_layers(raw: str | None) -> list[int] | None:
    if raw is None:
        return None
    out = []
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            lo, hi = int(lo), int(hi) if dash else None
        except ValueError:
            raise AttnlabError(f"--layers expects indices and ranges such as 0-3,10, got {raw!r}") from None
        if dash and hi < lo:
            raise AttnlabError(f"--layers: the range {part!r} runs backwards (write {hi}-{lo})")
        out += list(range(lo, hi + 1)) if dash else [lo]
    if not out or min(out) < 0:
        raise AttnlabError(f"--layers expects non-negative indices, got {raw!r}")
    return sorted(set(out))


def run(args) -> int:
    import torch

    from .. import data, models
    from ..advice.scan import heatmap, scan
    from ..train.data import eval_windows

    common.positive_int("--seq-len", args.seq_len, 2)
    opts = common.causal_method_options(args.methods, args.overrides, args.seq_len)
    common.positive_int("--num-tokens", args.num_tokens, 2)
    if args.num_tokens < args.seq_len:
        raise AttnlabError(f"--num-tokens {args.num_tokens} is less than one window of --seq-len {args.seq_len}")
    layers = parse_layers(args.layers)
    common.check_device(args.device)
    if args.text is not None:
        data.read_text(args.text)
    skeleton, causal = models.skeleton(args.model)
    if not causal:
        raise AttnlabError(f"{args.model!r} is not a causal LM; scan measures next-token KL")
    models.check_seq_len(skeleton, args.seq_len)
    n_layers = getattr(skeleton.config.get_text_config(), "num_hidden_layers", None)
    if layers is not None and n_layers is not None and max(layers) >= n_layers:
        raise AttnlabError(f"--layers {args.layers}: the model has {n_layers} attention layers (0..{n_layers - 1})")
    model, tok = models.load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    windows = eval_windows(tok, args.text, args.seq_len, max(1, args.num_tokens // args.seq_len))
    t0 = time.time()
    rows = scan(model, windows, opts, layers=layers, seed=args.seed, progress=not args.no_progress)
    print()
    print(format_table(rows))
    common.write_result(
        Path(args.out) / "scan.json", args.device,
        {"model": args.model, "seq_len": args.seq_len, "windows": len(windows), "text": args.text or "moby (held-out tail)",
         "seed": args.seed, "elapsed_s": round(time.time() - t0, 1), "rows": rows},
        None if args.no_plot else lambda png: heatmap(rows, png, title=f"attnlab scan: {args.model}, {len(windows)} "
                                                      f"held-out windows x {args.seq_len} tokens; KL when only that "
                                                      "layer is swapped"))
    return 0


def format_table(rows: list[dict]) -> str:
    """Per method: the least and most sensitive layers and the KL range."""
    lines = [f"{'method':<14} {'least sensitive layers (KL)':<52} most sensitive layers (KL)"]
    for m in dict.fromkeys(r["method"] for r in rows):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["kl"])
        fmt = lambda sel: ", ".join(f"{r['layer']} ({r['kl']:.2g})" for r in sel)  # noqa: E731
        lines.append(f"{m:<14} {fmt(rs[:4]):<52} {fmt(rs[::-1][:4])}")
    return "\n".join(lines)
