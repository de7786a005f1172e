"""`attnlab prune`: column-sum token pruning, scored by the attention each token receives, against random and
positional baselines: accuracy (encoder, Spam Assassin) or continuation KL / perplexity (causal LM, prompt
compression) vs the fraction of tokens kept."""
from __future__ import annotations

import time
from pathlib import Path

from ..types import AttnlabError
from . import common

DEFAULT_MODEL = {"spam": "minilm", "lm": "smollm2"}
DEFAULT_KEEP = "0.9,0.7,0.5,0.3,0.1"
TASK_FLAGS = {"spam": (("--after", "after"), ("--head", "head"), ("--batch-size", "batch_size")),
              "lm": (("--prompt-len", "prompt_len"),)}  # each task's own flags: given to the other, one error


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="token pruning by received attention (column sums) vs baselines",
                       description="Score tokens by the attention they receive (column sums over heads and queries, "
                                   "normalised by the queries that can see each token) and drop the rest. --task spam: "
                                   "an encoder (MiniLM) prunes inside its forward after the --after layers (special "
                                   "tokens kept), accuracy of a head trained on the full model. --task lm: a causal LM "
                                   "scores a prompt with itself, keeps a fraction (its first token always), and reads "
                                   "the continuation at the original positions: KL and perplexity vs the full prompt. "
                                   "Baselines: random, first (and for lm: last, H2O's accumulated attention and h2o = "
                                   "accumulated + the most recent half).")
    p.add_argument("--task", choices=("spam", "lm"), default="spam", help="spam: encoder accuracy; lm: prompt "
                                                                           "compression (default: %(default)s)")
    p.add_argument("--model", default=None, help="a packaged model or a local folder (default: minilm for spam, "
                                                 "smollm2 for lm)")
    p.add_argument("--keep", default=None, help="fractions of the tokens kept, each in (0, 1] (default: "
                                               f"{DEFAULT_KEEP})")
    p.add_argument("--threshold", type=float, default=None, help="keep tokens scoring at least this (1 = what "
                                                                  "uniform attention gives) instead of --keep; "
                                                                  "attention technique only")
    p.add_argument("--techniques", default=None, help="comma-separated: attention, random, first, last, "
                                                      "accumulated, h2o (lm) (default: attention,random,first for "
                                                      "spam; all six for lm)")
    p.add_argument("--after", default=None, help="spam: layers (0-based) after which tokens are pruned, comma-"
                                                 "separated; several = progressive, keep^(1/stages) each "
                                                 "(default: 2)")
    p.add_argument("--head", choices=["full", "pruned"], default=None,
                   help="spam: the classifier head is fitted on the full model's embeddings of the training messages "
                        "(full: pruning only at test time) or on embeddings made with the same pruning (pruned: the "
                        "head sees the features it is tested on) (default: full)")
    p.add_argument("--seq-len", type=int, default=None, help="spam: max tokens per message (default 256); lm: "
                                                             "prompt + continuation tokens per window (default 512)")
    p.add_argument("--prompt-len", type=int, default=None, help="lm: prompt tokens of each window (the rest is the "
                                                                "continuation) (default: 3/4 of --seq-len)")
    p.add_argument("--num-examples", type=int, default=None, help="spam: train and test messages (default 1000 and "
                                                                  "400); lm: held-out windows (default 4)")
    p.add_argument("--batch-size", type=int, default=None, help="spam: messages per forward, in the accuracy and the "
                                                                "timed passes (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: %(default)s)")
    common.add_model_run_arguments(p, "prune", "prune.json and prune.png")
    p.set_defaults(func=run)


def parse_keeps(raw: str) -> list[float]:
    return common.fraction_list("--keep", raw, what="the fraction of tokens kept")


def run(args) -> int:
    import torch

    from .. import data, models
    from ..reduction import token_prune as tp
    from ..train.data import eval_windows

    for task, flags in TASK_FLAGS.items():
        given = [flag for flag, dest in flags if getattr(args, dest) is not None]
        if task != args.task and given:
            raise AttnlabError(f"{', '.join(given)}: for --task {task} only (this run is --task {args.task})")
    if args.threshold is not None and args.keep is not None:
        raise AttnlabError("--keep and --threshold both choose the tokens kept: give one")
    args.keep = DEFAULT_KEEP if args.keep is None else args.keep
    keeps = parse_keeps(args.keep)
    args.after = "2" if args.after is None else args.after
    args.head = args.head or "full"
    args.batch_size = 32 if args.batch_size is None else args.batch_size
    allowed = tp.TECHNIQUES if args.task == "spam" else tp.PROMPT_TECHNIQUES
    default = ("attention", "random", "first") if args.task == "spam" else tp.PROMPT_TECHNIQUES
    techniques = default if args.techniques is None else tuple(t.strip() for t in args.techniques.split(",") if t.strip())
    unknown = [t for t in techniques if t not in allowed]
    if unknown or not techniques:
        raise AttnlabError(f"--techniques: unknown {unknown or techniques!r} for --task {args.task}; "
                           f"choose from {', '.join(allowed)}")
    if args.threshold is not None:
        if args.threshold < 0:
            raise AttnlabError(f"--threshold must be >= 0, got {args.threshold}")
        if set(techniques) != {"attention"}:
            raise AttnlabError("--threshold applies to the attention technique only (add --techniques attention)")
        keeps = [None]
    try:
        after = sorted({int(x) for x in args.after.split(",") if x.strip()})
    except ValueError:
        raise AttnlabError(f"--after expects layer indices such as 2 or 1,3, got {args.after!r}") from None
    if not after or min(after) < 0:
        raise AttnlabError(f"--after expects non-negative layer indices, got {args.after!r}")
    seq_len = args.seq_len if args.seq_len is not None else (256 if args.task == "spam" else 512)
    common.positive_int("--seq-len", seq_len, 4)
    if args.prompt_len is None:
        args.prompt_len = seq_len * 3 // 4
    if args.num_examples is not None:
        common.positive_int("--num-examples", args.num_examples, 1)
    common.positive_int("--batch-size", args.batch_size, 1)
    if args.task == "lm" and not 1 <= args.prompt_len <= seq_len - 2:
        raise AttnlabError(f"--prompt-len {args.prompt_len} must be in [1, --seq-len - 2 = {seq_len - 2}] (the rest "
                           "is the continuation)")
    common.check_device(args.device)
    name = args.model or DEFAULT_MODEL[args.task]
    skeleton, causal = models.skeleton(name)  # from the config alone: the weights load after every check
    if args.task == "lm" and not causal:
        raise AttnlabError(f"--task lm needs a causal LM; {name!r} is an encoder (use --task spam)")
    if args.task == "spam" and causal:
        raise AttnlabError(f"--task spam needs an encoder; {name!r} is a causal LM (use --task lm)")
    layers = getattr(skeleton.config.get_text_config(), "num_hidden_layers", None)
    if args.task == "spam" and layers and max(after) > layers - 2:
        raise AttnlabError(f"--after {args.after}: the model has {layers} layers; prune after layers 0..{layers - 2}")
    models.check_seq_len(skeleton, seq_len)  # an encoder's position embeddings too (MiniLM: 512)
    split = data.spam_assassin() if args.task == "spam" else None  # a missing dataset fails before the model loads
    model, tok = models.load(name, dtype=getattr(torch, args.dtype), device=args.device)
    started = time.time()
    print(f"attnlab prune: task={args.task} model={name} keep={args.keep if args.threshold is None else 'threshold ' + str(args.threshold)} "
          f"techniques={','.join(techniques)}", flush=True)
    if args.task == "spam":
        train, test = split
        n_train, n_test = (args.num_examples, args.num_examples) if args.num_examples else (1000, 400)
        rows = tp.evaluate_spam(model, tok, train[:n_train], test[:n_test], keeps=keeps, techniques=techniques,
                                after=after, threshold=args.threshold, seq_len=seq_len, progress=not args.no_progress,
                                head=args.head, batch_size=args.batch_size, seed=args.seed)
        setup = {"train": min(n_train, len(train)), "test": min(n_test, len(test)), "seq_len": seq_len, "after": after,
                 "head": args.head, "batch_size": args.batch_size, "seed": args.seed}
    else:
        n = args.num_examples or 4
        windows = eval_windows(tok, None, seq_len, n)
        rows = tp.evaluate_prompt(model, windows, prompt_len=args.prompt_len, keeps=keeps, techniques=techniques,
                                  threshold=args.threshold, seed=args.seed, progress=not args.no_progress)
        setup = {"windows": int(windows.shape[0]), "seq_len": seq_len, "prompt_len": args.prompt_len,
                 "text": "moby_dick (held-out tail)", "seed": args.seed}
    print()
    print(format_table(rows, args.task))
    if args.threshold is not None and not args.no_plot:
        print("(no plot: --threshold gives one point per technique, the table is all of it)")
    out = Path(args.out)
    title = (f"attnlab prune --task {args.task}: {name}, " +
             (f"pruned after layer(s) {','.join(map(str, after))}, {setup['test']} test messages"
              + ("; head fitted on pruned embeddings" if args.head == "pruned" else "") if args.task == "spam"
              else f"{setup['windows']} held-out windows, prompt {args.prompt_len} + {seq_len - args.prompt_len} tokens"))
    common.write_result(out / "prune.json", args.device,
                        {"task": args.task, "model": name, "dtype": args.dtype, "setup": setup,
                         "techniques": list(techniques),
                         "elapsed_s": round(time.time() - started, 1), "rows": rows},
                        None if args.no_plot or args.threshold is not None else
                        lambda png: plot(rows, args.task, png, title))
    return 0


def format_table(rows: list[dict], task: str) -> str:
    if task == "spam":
        lines = [f"{'technique':<17} {'keep':>5} {'kept':>6} {'accuracy':>9} {'retention':>9} {'seconds':>8} {'speed-up':>8}"]
        for r in rows:
            keep = "thr" if r["keep"] is None else f"{r['keep']:.2f}"
            lines.append(f"{r['technique']:<17} {keep:>5} {r['kept_fraction']:>6.3f} {r['accuracy']:>9.4f} "
                         f"{r['acc_retention']:>9.4f} {r['seconds']:>8.3f} {r['speedup']:>8.2f}")
        return "\n".join(lines)
    lines = [f"{'technique':<17} {'keep':>5} {'kept':>6} {'KL':>8} {'KL p95':>7} {'top-1':>6} {'ppl':>8} {'ms':>8} {'score ms':>8} {'KV MiB':>7}"]
    for r in rows:
        keep = "thr" if r["keep"] is None else f"{r['keep']:.2f}"
        lines.append(f"{r['technique']:<17} {keep:>5} {r['kept_fraction']:>6.3f} {r['kl']:>8.4f} {r['kl_p95']:>7.3f} "
                     f"{r['top1']:>6.3f} {r['ppl']:>8.2f} {r['ms']:>8.1f} {r.get('score_ms', 0):>8.1f} "
                     f"{r['kv_bytes'] / 2**20:>7.2f}")
    return "\n".join(lines)


def plot(rows: list[dict], task: str, path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import save

    metrics = [("accuracy", "test accuracy"), ("speedup", "speed-up of the test pass (x)")] if task == "spam" else \
        [("kl", "KL(full prompt || kept prompt), nats/token"), ("ppl", "continuation perplexity")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    base = rows[0]
    techniques = list(dict.fromkeys(r["technique"] for r in rows[1:]))
    markers = dict(zip(techniques, "osD^v<>"))
    for ax, (key, label) in zip(axes, metrics):
        for tech in techniques:
            rs = sorted((r for r in rows if r["technique"] == tech), key=lambda r: r["kept_fraction"])
            ys = [max(r[key], 1e-5) if key == "kl" else r[key] for r in rs]  # KL 0 (all kept) on the log axis
            ax.plot([100 * r["kept_fraction"] for r in rs], ys, marker=markers[tech], label=tech)
        if key in ("accuracy", "ppl", "speedup"):  # the full model's level (speed-up: 1x, slower below it)
            ax.axhline(base[key], color="gray", ls="--", lw=1)
            ax.text(0.99, base[key], f"all tokens {base[key]:.3g}" + ("x " if key == "speedup" else " "), color="gray", fontsize=8, va="bottom",
                    ha="right", transform=ax.get_yaxis_transform())
        if key == "kl":
            ax.set_yscale("log")
        ax.set(xlabel="tokens kept (%)", ylabel=label)
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path, title)
