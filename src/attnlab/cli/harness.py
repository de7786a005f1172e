"""`attnlab harness`: lm-evaluation-harness tasks on a causal LM as shipped and with methods, per-layer specs or saved
(distilled) attention swapped in, offline (local tasks from the held-out text; eval/harness.py)."""
from __future__ import annotations

import time
from pathlib import Path

from ..types import AttnlabError
from . import common


def add_parser(sub) -> None:
    from ..eval.harness import LOCAL_TASKS

    p = sub.add_parser("harness", help="lm-evaluation-harness tasks on the original and swapped model (offline)",
                       description="Run lm-evaluation-harness (PyPI lm-eval, its Python API) on a causal LM as shipped "
                                   "and with each method, per-layer spec or saved attention swapped in. No standard "
                                   "task's data is reachable offline, so the tasks are attnlab's local ones, written "
                                   "from the held-out tail of Moby Dick: " + ", ".join(LOCAL_TASKS) + ".")
    p.add_argument("--model", default="smollm2", help="a packaged causal LM (smollm2) or a local model folder")
    p.add_argument("--methods", default=None, help="comma-separated methods swapped in, each one more row (default: "
                                                   "window,linear; none when --spec or --load is given)")
    common.add_set_argument(p)
    p.add_argument("--spec", action="append", default=[], metavar="FILE.json",
                   help="a per-layer swap spec (attnlab advise's spec.json, attnlab.SwapSpec JSON) (repeatable)")
    p.add_argument("--load", action="append", default=[], metavar="DIR",
                   help="a saved attention (attnlab distill --out DIR/attention) (repeatable)")
    p.add_argument("--tasks", default=",".join(LOCAL_TASKS), help="lm-eval task names (default: %(default)s)")
    p.add_argument("--limit", type=int, default=100, help="documents per task (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="lm-eval batch size (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=None, help="the length method defaults are taken at (default: 512)")
    common.add_model_run_arguments(p, "harness", "harness.json and harness.png")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .. import models
    from ..eval import compare, harness

    harness.check_installed()
    tasks = common.name_list(args.tasks, "--tasks")
    common.positive_int("--limit", args.limit, 1)
    common.positive_int("--batch-size", args.batch_size, 1)
    common.check_device(args.device)
    methods = common.name_list(args.methods)
    given_len = args.seq_len is not None
    args.seq_len = 512 if args.seq_len is None else common.positive_int("--seq-len", args.seq_len, 2)
    if methods is None and not (args.spec or args.load):
        methods = ["window", "linear"]
    variants = compare.resolve(methods or [], common.parse_overrides(args.overrides), args.seq_len, specs=args.spec,
                               loads=args.load)
    skeleton, causal = models.skeleton(args.model)
    if not causal:
        raise AttnlabError(f"{args.model!r} is not a causal LM; the harness tasks score a decoder's continuations")
    if given_len:  # the default only sets method options: a model with shorter positions is not refused for it
        models.check_seq_len(skeleton, args.seq_len)
    compare.check_variants(variants, skeleton)
    started = time.time()
    print(f"attnlab harness: model={args.model} tasks={','.join(tasks)} limit={args.limit} variants=original,"
          f"{','.join(v.label for v in variants)}", flush=True)
    model, tok = models.load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    rows = harness.evaluate(model, tok, variants, tasks=tasks, limit=args.limit, batch_size=args.batch_size,
                            progress=not args.no_progress)
    print()
    print(format_table(rows, {v.label: v.options for v in variants}))
    import lm_eval

    common.write_result(
        Path(args.out) / "harness.json", args.device,
        {"model": args.model, "tasks": tasks, "limit": args.limit, "lm_eval_version": lm_eval.__version__,
         "variants": {v.label: v.options for v in variants}, "elapsed_s": round(time.time() - started, 1),
         "rows": rows},
        None if args.no_plot else lambda png: plot(rows, png, title=f"attnlab harness: {args.model}, lm-eval "
                                                                   f"{lm_eval.__version__}, {args.limit} documents per task"))
    return 0


def format_table(rows: list[dict], options: dict | None = None) -> str:
    """lm-eval's value ± its bootstrap stderr per (task, metric), a line per variant; `options`: {variant label:
    its options}, shown beside the label (as the README's table does)."""
    cols = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["task"], r["metric"]): r for r in rows}

    def label(v):  # a spec or saved variant shows its per-layer spec (not its folder), as compare's table does
        opts = (options or {}).get(v)
        text = v if not opts else (f"{v} ({opts['spec']})" if "spec" in opts else
                                   f"{v} ({', '.join(f'{k}={x}' for k, x in opts.items() if k != 'max_len')})")
        return text if len(text) <= 48 else text[:47] + "…"
    width = max([len("variant")] + [len(label(v)) for v in variants])
    lines = [f"{'variant':<{width}} " + " ".join(f"{t.removeprefix('attnlab_')[:18] + ' ' + m:>28}" for t, m in cols)]
    for v in variants:
        cells = []
        for t, m in cols:
            r = by.get((v, t, m))
            cell = "-" if r is None else format(r["value"], ".4g") + (f" ± {r['stderr']:.2g}" if r.get("stderr") else "")
            cells.append(f"{cell:>28}")
        lines.append(f"{label(v):<{width}} " + " ".join(cells))
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import save

    cols = [c for c in dict.fromkeys((r["task"], r["metric"]) for r in rows) if c[1] != "perplexity"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["task"], r["metric"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cols) * max(1, len(variants)) / 2), 4))
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs = [j + i * width for j in range(len(cols))]
        vals = [by[(v, t, m)]["value"] if (v, t, m) in by else 0 for t, m in cols]
        errs = [by[(v, t, m)]["stderr"] or 0 if (v, t, m) in by else 0 for t, m in cols]
        ax.bar(xs, vals, width, yerr=errs, capsize=2, label=v)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))])
    ax.set_xticklabels([f"{t.removeprefix('attnlab_')}\n{m}" for t, m in cols], fontsize=8)
    ax.set_ylabel("score (higher is better)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    save(fig, path, title)
