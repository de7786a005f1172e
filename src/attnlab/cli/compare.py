"""`attnlab compare`: the main job. Defaults: SmolLM2-135M on held-out Moby Dick windows, every method."""
from __future__ import annotations

import inspect
import json
import os
import sys
import time
from pathlib import Path

from ..types import AttnlabError
from . import common


def add_parser(sub) -> None:
    from ..eval.tasks import TASKS

    p = sub.add_parser("compare", help="fidelity of every method swapped into a real model (the main job)",
                       description="Swap each method (or a per-layer spec, or a saved trained attention) into a real "
                                   "model and measure how far its outputs move, without fine-tuning.")
    p.add_argument("--model", default=None, help="smollm2 (default for --task lm), minilm (default for --task spam), "
                                                 "or a local model folder")
    p.add_argument("--task", choices=sorted(TASKS), default=None,
                   help="; ".join(f"{t.name}: {t.description}" for t in TASKS.values()) + " (default: by model)")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: all registered)")
    common.add_set_argument(p)
    p.add_argument("--spec", action="append", default=[], metavar="FILE.json",
                   help="a per-layer swap spec (attnlab.SwapSpec JSON) compared as one more row (repeatable)")
    p.add_argument("--load", action="append", default=[], metavar="DIR",
                   help="a saved attention (attnlab.save / attnlab distill --out) compared as one more row (repeatable)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per window (lm: 512, spam: 128)")
    p.add_argument("--num-tokens", type=int, default=None, help="lm: held-out tokens evaluated (windows = num_tokens / "
                                                                "seq_len; default 2048)")
    p.add_argument("--num-examples", type=int, default=None, help="spam: cap on train and test emails (default 1000 / 400)")
    p.add_argument("--grad-tokens", type=int, default=None, help="lm: tokens of the window used for gradient cosine "
                                                                 "(default: 128, or --seq-len if shorter)")
    p.add_argument("--text", default=None, help="lm: a UTF-8 text file instead of the packaged Moby Dick")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model and attention dtype")
    p.add_argument("--out", default=str(common.default_results_dir("compare")),
                   help="folder for compare-<task>-<timestamp>.json and .png (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny run for tests: 2 windows of 64 tokens, 3 methods")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .. import models
    from ..eval import compare, tasks
    from ..metrics import TARGETS
    from ..adapters.state import read_meta

    model_name = args.model
    if args.task is None:
        kind = models.MODELS[model_name].task if model_name in models.MODELS else "lm"
        args.task = kind
    task = tasks.get(args.task)
    model_name = model_name or task.default_model
    given = {flag: v for flag, v in (("--seq-len", args.seq_len), ("--num-tokens", args.num_tokens)) if v is not None}
    args.seq_len = task.default_seq_len if args.seq_len is None else common.positive_int("--seq-len", args.seq_len, 2)
    args.num_tokens = 2048 if args.num_tokens is None else common.positive_int("--num-tokens", args.num_tokens, 2)
    if args.grad_tokens is not None:
        common.positive_int("--grad-tokens", args.grad_tokens, 2)
        if args.grad_tokens > args.seq_len:
            raise AttnlabError(f"--grad-tokens {args.grad_tokens} is longer than a window (--seq-len {args.seq_len})")
    if args.num_examples is not None:
        common.positive_int("--num-examples", args.num_examples, 2)
    for flag, value, only in (("--num-examples", args.num_examples, "spam"), ("--grad-tokens", args.grad_tokens, "lm"),
                              ("--text", args.text, "lm"), ("--num-tokens", given.get("--num-tokens"), "lm")):
        if value is not None and task.name != only:
            raise AttnlabError(f"{flag} applies to --task {only}, not {task.name}")
    args.grad_tokens = min(128, args.seq_len) if args.grad_tokens is None else args.grad_tokens
    methods = common.name_list(args.methods)
    if args.quick:
        args.seq_len = min(args.seq_len, 64)
        methods = methods or (None if (args.spec or args.load) else ["sdpa", "window", "linear"])
        args.num_tokens, args.grad_tokens = 2 * args.seq_len, min(args.grad_tokens, 32)
        args.num_examples = args.num_examples or 60
        unused = [f"{flag} {v}" for flag, v in given.items()
                  if (args.seq_len if flag == "--seq-len" else args.num_tokens) != v]
        if unused:  # said, not silent
            runs = f"2 windows of {args.seq_len} tokens" if task.name == "lm" else f"{args.seq_len} tokens"
            print(f"attnlab compare: --quick runs {runs}, not {' and '.join(unused)}", file=sys.stderr)
    common.check_device(args.device)
    # every input check comes before the (slow) model load: methods and options, spec files, saved dirs, the model's
    # kind, length and layers (from its config alone), data
    overrides = common.parse_overrides(args.overrides)
    variants = compare.resolve(methods, overrides, args.seq_len, specs=args.spec, loads=args.load)
    skeleton, causal = models.skeleton(model_name)
    if (task.model_kind == "causal-lm") != causal:
        raise AttnlabError(f"--task {task.name} needs a {task.model_kind}; {model_name!r} is "
                           f"{'a causal LM' if causal else 'an encoder'} (try --task {'lm' if causal else 'spam'})")
    models.check_seq_len(skeleton, args.seq_len)
    if args.num_tokens < args.seq_len:
        raise AttnlabError(f"--num-tokens {args.num_tokens} is less than one window of --seq-len {args.seq_len}")
    compare.check_variants(variants, skeleton, args.seq_len, named=methods is not None)
    data = task.read_data(args)
    dtype = getattr(torch, args.dtype)
    unused = args.num_tokens % args.seq_len if task.name == "lm" else 0
    print(f"attnlab compare: task={task.name} model={model_name} seq_len={args.seq_len} device={args.device} "
          f"dtype={args.dtype}" + (f" (windows of --seq-len: the last {unused} of --num-tokens {args.num_tokens} "
                                   "unused)" if unused else ""), flush=True)
    for v in variants:  # a distilled attention measured at another length than it was trained at: say so
        trained = read_meta(v.target.path).get("extra", {}).get("distill", {}) if v.method == "saved" else {}
        if trained.get("seq_len") not in (None, args.seq_len):
            kl = (f" (KL {trained['kl_before']:.3g} -> {trained['kl_after']:.3g} there)"
                  if isinstance(trained.get("kl_before"), float) and isinstance(trained.get("kl_after"), float) else "")
            print(f"note: {v.label} was distilled at {trained['seq_len']} tokens{kl}; here it runs at {args.seq_len} "
                  "(--seq-len)", flush=True)
    model, tok = models.load(model_name, dtype=dtype, device=args.device)

    result = Path(args.out) / f"compare-{task.name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    partial = result.with_name(f"{result.stem}-{os.getpid()}.partial.jsonl")  # each row as it is done: a run that
    # stops early keeps them (the pid: two runs started in the same second into one --out)

    def on_row(row):
        partial.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("a") as f:
            f.write(json.dumps(row, default=str) + "\n")

    t0 = time.time()
    takes_on_row = "on_row" in inspect.signature(task.run).parameters  # a task registered before on_row existed
    try:
        rows, setup = task.run(model, tok, variants, data, args, **({"on_row": on_row} if takes_on_row else {}))
    except KeyboardInterrupt:
        print("\nattnlab: interrupted" + (f"; the rows done so far are in {partial}" if partial.exists() else ""),
              file=sys.stderr)
        return 130
    except BaseException:
        if partial.exists():
            print(f"\nattnlab: compare stopped; the rows done so far are in {partial}", file=sys.stderr)
        raise
    elapsed = time.time() - t0
    print()
    print(task.table(rows))
    title = plot_title(task.name, model_name, setup, args.seq_len, trained=any(v.method == "saved" for v in variants))
    common.write_result(
        result, args.device,
        {"task": task.name, "model": model_name, "seq_len": args.seq_len, "dtype": args.dtype, "setup": setup,
         "elapsed_s": round(elapsed, 1), "targets": {k: list(v) for k, v in TARGETS.items()}, "rows": rows},
        None if args.no_plot else lambda png: task.plot(rows, png, title=title))
    partial.unlink(missing_ok=True)  # the whole result is written
    return 0


def plot_title(task: str, model_name: str, setup: dict, seq_len: int, trained: bool) -> str:
    """The compare plot's title; `trained`: a saved (distilled) attention is among the rows (--load)."""
    if task == "lm":
        return (f"attnlab compare: {model_name}, {setup['windows']} held-out windows x {seq_len} tokens of "
                f"{setup['text']}; " + ("saved (trained) attention as loaded, every other method untrained"
                                        if trained else "every method swapped in without fine-tuning"))
    return (f"attnlab compare: {model_name} on Spam Assassin ({setup['train']} train / {setup['test']} test emails, "
            f"{seq_len} tokens); frozen head, " + ("saved attention as loaded, the rest untrained" if trained
                                                  else "no fine-tuning"))
