"""`attnlab press`: KV-cache eviction (StreamingLLM, SnapKV, TOVA, H2O, key norm, random) on held-out text: once after
the prompt (continuation KL and perplexity vs the fraction evicted, the KV bytes kept), or with the cache bounded
while the text streams in chunks (--max-cache: KL and perplexity vs the bound)."""
from __future__ import annotations

import itertools
import time
from pathlib import Path

from ..types import AttnlabError
from . import common

DEFAULT_EVICT = "0.1,0.3,0.5,0.7,0.9"
MARKERS = "osD^v<>pP*XhH8d"  # one a press (cycled past 15)


def add_parser(sub) -> None:
    from ..reduction.kv_press import PRESSES

    p = sub.add_parser("press", help="KV-cache eviction after the prompt: presses vs the fraction evicted",
                       description="Run each held-out window's prompt, evict a fraction of its KV cache per layer and "
                                   "KV head with each press (scores from the prompt's own queries and keys), then "
                                   "score the continuation on the pressed cache at its original positions: KL(full "
                                   "cache || pressed) and perplexity vs the fraction evicted, and the KV bytes kept. "
                                   "With --max-cache: the bounded-cache mode, each window scored whole in chunks on "
                                   "a cache pressed back to the bound after every chunk.")
    p.add_argument("--model", default="smollm2", help="a packaged causal LM (smollm2) or a local model folder")
    p.add_argument("--presses", default=",".join(PRESSES), help="comma-separated (default: %(default)s); "
                   "adakv_<press> shares each layer's budget between its KV heads by that press's scores (Ada-KV); "
                   "pyramid_<press> gives the lower layers more of the same total (PyramidKV)")
    p.add_argument("--alpha", type=float, default=None, help="adakv_ presses: the share of the budget every head keeps "
                                                             "at least (Ada-KV's safeguard; default 0.2)")
    p.add_argument("--slope", type=float, default=None, help="pyramid_ presses (PyramidKV): layer l of L keeps budget x "
                                                             "(1 + slope x (1 - 2l/(L-1))), in [0, 1) (default 0.5)")
    p.add_argument("--evict", default=None, help="fractions of the prompt's cache evicted, each in [0, 1) (default: "
                                                 f"{DEFAULT_EVICT}; not with --max-cache)")
    p.add_argument("--seq-len", type=int, default=2048, help="prompt + continuation tokens per window "
                                                             "(default: %(default)s)")
    p.add_argument("--prompt-len", type=int, default=None, help="prompt tokens of each window (default: 7/8 of "
                                                                "--seq-len, 1792 of 2048; not used with --max-cache)")
    p.add_argument("--num-examples", type=int, default=2, help="held-out windows (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random press (default: %(default)s)")
    p.add_argument("--max-cache", default=None, help="bounded-cache mode instead of --evict: comma-separated cache "
                                                     "bounds in tokens; each window is scored whole in chunks with "
                                                     "the cache pressed back to the bound after every chunk "
                                                     "(writes press-bounded.json)")
    p.add_argument("--chunk", type=int, default=None, help="bounded-cache mode: tokens fed per call (default: 64)")
    common.add_model_run_arguments(p, "press", "press.json and press.png")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .. import models
    from ..reduction import kv_press as kp
    from ..train.data import eval_windows

    presses = [x.strip() for x in args.presses.split(",") if x.strip()]
    for flag, value, prefix in (("--alpha", args.alpha, "adakv_"), ("--slope", args.slope, "pyramid_")):
        if value is not None and not any(n.startswith(prefix) for n in presses):
            raise AttnlabError(f"{flag} applies to {prefix}<press> presses only; none is in --presses")
    bounded = args.max_cache is not None
    for flag, given, mode in (("--evict", args.evict, not bounded), ("--prompt-len", args.prompt_len, not bounded),
                              ("--chunk", args.chunk, bounded)):
        if given is not None and not mode:
            raise AttnlabError(f"{flag} is {'not used with' if bounded else 'for the bounded-cache mode, with'} "
                               "--max-cache")
    args.alpha = 0.2 if args.alpha is None else args.alpha
    args.slope = 0.5 if args.slope is None else args.slope
    args.chunk = 64 if args.chunk is None else args.chunk
    args.evict = DEFAULT_EVICT if args.evict is None else args.evict
    for name in presses:
        kp.get_press(name, evict=0.0, alpha=args.alpha, slope=args.slope)  # an unknown name, a bad alpha / slope
    if args.max_cache is not None and any(n.startswith(tuple(kp.WRAPPERS)) for n in presses):
        raise AttnlabError("adakv_ and pyramid_ presses press the prompt once; the bounded-cache mode (--max-cache) "
                           "takes the plain presses")
    if not presses:
        raise AttnlabError("--presses is empty")
    evicts = common.fraction_list("--evict", args.evict, upper_open=True, what="the fraction of the cache evicted")
    common.positive_int("--seq-len", args.seq_len, 4)
    common.positive_int("--num-examples", args.num_examples, 1)
    if args.prompt_len is None:
        args.prompt_len = min(args.seq_len * 7 // 8, args.seq_len - 2)
    if args.max_cache is None and not 1 <= args.prompt_len <= args.seq_len - 2:
        raise AttnlabError(f"--prompt-len {args.prompt_len} must be in [1, --seq-len - 2 = {args.seq_len - 2}]")
    common.check_device(args.device)
    skeleton, causal = models.skeleton(args.model)
    if not causal:
        raise AttnlabError(f"{args.model!r} is not a causal LM; presses act on a decoder's KV cache")
    models.check_seq_len(skeleton, args.seq_len)
    bounds = None
    if args.max_cache is not None:
        bounds = common.int_list("--max-cache", args.max_cache)
        common.positive_int("--chunk", args.chunk, 1)
        bad = [m for m in bounds if m >= args.seq_len - args.chunk - 1]
        if bad:
            raise AttnlabError(f"--max-cache {bad[0]} must be below --seq-len - --chunk - 1 = "
                               f"{args.seq_len - args.chunk - 1} (the window must go on past the bound)")
    started = time.time()
    if bounds is not None:
        return run_bounded(args, presses, bounds, started)
    window = kp.SnapKV(evict=0.0).window
    least = 1 - args.slope if any(n.startswith("pyramid_") and "snapkv" in n for n in presses) else 1.0
    small = [e for e in evicts if least * kp.SnapKV(evict=e).budget(args.prompt_len) < window]  # pyramid's top layer
    if small and any("snapkv" in n for n in presses):
        print(f"note: at evict {', '.join(map(str, small))} the snapkv presses keep fewer than their {window}-token "
              "observation window (in some layer, for pyramid_), which they keep whatever the scores: they keep its "
              "newest tokens there, as `window` does", flush=True)
    print(f"attnlab press: model={args.model} presses={','.join(presses)} evict={args.evict} windows={args.num_examples} x "
          f"({args.prompt_len} + {args.seq_len - args.prompt_len}) tokens", flush=True)
    model, tok = models.load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    windows = eval_windows(tok, None, args.seq_len, args.num_examples)
    rows = kp.evaluate(model, windows, prompt_len=args.prompt_len, evicts=evicts, presses=presses,
                       progress=not args.no_progress, seed=args.seed, alpha=args.alpha, slope=args.slope)
    print()
    print(format_table(rows))
    device = common.environment(args.device)["device_name"]
    flat = [{"technique": r["technique"], "impl": r["impl"], "fraction": r["evict"], "metric": metric,
             "value": r[metric], "baseline_value": base, "ms": r["ms"], "peak_mem_bytes": None, "kv_bytes": r["kv_bytes"],
             "device": device} for r in rows for metric, base in (("ppl", r["ppl_original"]), ("kl", 0.0))]
    common.write_result(
        Path(args.out) / "press.json", args.device,
        {"model": args.model, "seq_len": args.seq_len, "prompt_len": args.prompt_len, "windows": int(windows.shape[0]),
         "text": "moby_dick (held-out tail)", "elapsed_s": round(time.time() - started, 1), "rows": rows,
         "result_rows": flat},
        None if args.no_plot else lambda png: plot(rows, png, title=(
            f"attnlab press: {args.model}, {int(windows.shape[0])} held-out windows, prompt {args.prompt_len} + "
            f"{args.seq_len - args.prompt_len} continuation tokens; eviction once, after the prompt")))
    return 0


def run_bounded(args, presses: list[str], bounds: list[int], started: float) -> int:
    import torch

    from .. import models
    from ..reduction import kv_press as kp
    from ..train.data import eval_windows

    print(f"attnlab press: bounded cache {bounds} tokens, chunks of {args.chunk}; model={args.model} "
          f"presses={','.join(presses)} windows={args.num_examples} x {args.seq_len} tokens", flush=True)
    model, tok = models.load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    windows = eval_windows(tok, None, args.seq_len, args.num_examples)
    rows = kp.evaluate_stream(model, windows, max_caches=bounds, chunk=args.chunk, presses=presses,
                              progress=not args.no_progress, seed=args.seed)
    print()
    lines = [f"{'press':<14} {'bound':>6} {'from':>6} {'KL':>8} {'KL p95':>7} {'top-1':>6} {'ppl':>8} {'full ppl':>8}"]
    lines += [f"{r['technique']:<14} {r['max_cache']:>6} {r['from_position']:>6} {r['kl']:>8.4f} {r['kl_p95']:>7.3f} "
              f"{r['top1']:>6.3f} {r['ppl']:>8.2f} {r['ppl_original']:>8.2f}" for r in rows]
    print("\n".join(lines))
    common.write_result(
        Path(args.out) / "press-bounded.json", args.device,
        {"model": args.model, "seq_len": args.seq_len, "chunk": args.chunk, "max_cache": bounds,
         "windows": int(windows.shape[0]), "text": "moby_dick (held-out tail)",
         "elapsed_s": round(time.time() - started, 1), "rows": rows},
        None if args.no_plot else lambda png: plot_bounded(rows, png, title=(
            f"attnlab press, bounded cache: {args.model}, {int(windows.shape[0])} held-out windows of {args.seq_len} "
            f"tokens fed in chunks of {args.chunk}; the cache pressed back to the bound after every chunk")))
    return 0


def plot_bounded(rows: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import save

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    names = list(dict.fromkeys(r["technique"] for r in rows if r["technique"] != "full_cache"))
    for name, marker in zip(names, itertools.cycle(MARKERS)):
        rs = sorted((r for r in rows if r["technique"] == name), key=lambda r: r["max_cache"])
        for ax, key in zip(axes, ("kl", "ppl")):
            ax.plot([r["max_cache"] for r in rs], [max(r[key], 1e-5) for r in rs], marker=marker, label=name)
    full = sorted((r for r in rows if r["technique"] == "full_cache"), key=lambda r: r["max_cache"])
    axes[1].plot([r["max_cache"] for r in full], [r["ppl"] for r in full], color="gray", ls="--", lw=1,
                 label="full cache (same positions)")
    axes[0].set(yscale="log", ylabel="KL(full cache || bounded), nats/token")
    axes[1].set(yscale="log", ylabel="perplexity after the first eviction")
    for ax in axes:
        ax.set(xlabel="cache bound (tokens)", xscale="log")
        ax.set_xticks(sorted({r["max_cache"] for r in rows}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path, title)


def format_table(rows: list[dict]) -> str:
    lines = [f"{'press':<14} {'evicted':>7} {'KL':>8} {'KL p95':>7} {'top-1':>6} {'ppl':>8} {'KV MiB':>7} {'ms':>8}"]
    for r in rows:
        lines.append(f"{r['technique']:<14} {r['evict']:>7.0%} {r['kl']:>8.4f} {r['kl_p95']:>7.3f} {r['top1']:>6.3f} "
                     f"{r['ppl']:>8.2f} {r['kv_bytes'] / 2**20:>7.2f} {r['ms']:>8.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import save

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    base = rows[0]
    names = list(dict.fromkeys(r["technique"] for r in rows[1:]))
    for name, marker in zip(names, itertools.cycle(MARKERS)):
        rs = sorted((r for r in rows if r["technique"] == name), key=lambda r: r["evict"])
        for ax, key in zip(axes, ("kl", "ppl")):
            ax.plot([100 * r["evict"] for r in rs], [max(r[key], 1e-5) for r in rs], marker=marker, label=name)
    axes[1].axhline(base["ppl"], color="gray", ls="--", lw=1, label=f"full cache ({base['ppl']:.3g})")
    axes[0].set(yscale="log", ylabel="KL(full cache || pressed), nats/token")
    axes[1].set(yscale="log", ylabel="continuation perplexity")
    for ax in axes:
        ax.set_xlabel("prompt KV cache evicted (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path, title)
