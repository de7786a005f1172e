"""`attnlab sparsify`: measure where a model's attention goes on a corpus, keep the top blocks per layer and head
as a global sparse pattern, and report held-out perplexity and KL at several sparsities beside a window + sinks
mask of the same density."""
from __future__ import annotations

import time
from pathlib import Path

from ..types import AttnlabError
from . import common


SENSITIVITY = {"alpha": 0.5, "probe": 0.97, "probe_windows": 2}  # --budget sensitivity's options and defaults


def add_parser(sub) -> None:
    p = sub.add_parser("sparsify", help="data-informed global sparse attention: measure, select blocks, evaluate",
                       description="Run the model over a corpus, average its attention per layer and head over "
                                   "block x block tiles (blockwise, no T x T matrix), save the scores as a pattern "
                                   "(OUT/pattern: safetensors + JSON), and evaluate held-out perplexity and KL vs the "
                                   "original with the top (1 - p) of the blocks kept (diagonal always), beside a window "
                                   "+ sinks mask of the same causal density. Use the pattern with "
                                   "attnlab.swap(model, 'global_sparse', pattern='OUT/pattern', sparsity=p).")
    p.add_argument("--model", default="smollm2", help="a packaged causal LM (smollm2) or a local model folder")
    p.add_argument("--data", default=None, help="corpora measured on (and probed, --budget sensitivity), comma-"
                                                "separated (sotu, brown, moby's first 90%%, or UTF-8 files) (default: "
                                                "sotu,brown)")
    p.add_argument("--eval", dest="eval_text", default="moby", help="held-out text: moby (the tail of Moby Dick) or a "
                                                                     "UTF-8 file (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window, measured and evaluated (default: %(default)s)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per block of the pattern measured (default: "
                                                                "64; with --pattern: the pattern's own)")
    p.add_argument("--sinks", type=int, default=None, help="first tokens every query keeps at token level, as "
                                                            "StreamingLLM's sinks (0: none), in the pattern and the "
                                                            "window baseline alike (default: 4; with --pattern: "
                                                            "the pattern's own)")
    p.add_argument("--windows", type=int, default=None, help="corpus windows measured (default: 16; not with "
                                                              "--pattern)")
    p.add_argument("--eval-windows", type=int, default=4, help="held-out windows evaluated (default: %(default)s)")
    p.add_argument("--sparsity", default="0,0.5,0.7,0.8,0.9,0.95",
                   help="fractions of the causal blocks pruned, each in [0, 1) (default: %(default)s)")
    p.add_argument("--share", default="layer",
                   help="who shares the block budget, comma-separated to compare: layer (a layer's heads share it: a "
                        "head whose attention is spread gets more blocks), head (each head keeps 1 - p of its own), "
                        "model (all heads of all layers share one) (default: %(default)s)")
    p.add_argument("--budget", default="uniform",
                   help="how the layers divide the blocks, comma-separated to compare: uniform (each layer prunes p) | "
                        "sensitivity (each layer alone is first pruned at --probe on --probe-windows calibration "
                        "windows and its KL measured; a layer then keeps blocks in proportion to KL ** --alpha, at the "
                        "uniform budget's mean density; the probe is stored in the pattern) (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=None, help="exponent of the sensitivity budget (0: uniform in "
                   f"blocks; --budget sensitivity only) (default: {SENSITIVITY['alpha']})")
    p.add_argument("--probe", type=float, default=None, help="fraction of one layer's blocks pruned when probing its "
                   f"sensitivity (--budget sensitivity only) (default: {SENSITIVITY['probe']})")
    p.add_argument("--probe-windows", type=int, default=None, help="calibration windows of the probe (from --data, "
                   f"not the held-out text; --budget sensitivity only) (default: {SENSITIVITY['probe_windows']})")
    p.add_argument("--pattern", default=None, metavar="DIR", help="evaluate an existing pattern instead of measuring one")
    p.add_argument("--no-baseline", action="store_true", help="skip the window + sinks baseline")
    p.add_argument("--cost", action="store_true", help="also time the model's layers (fwd and fwd+bwd, batch 1, one "
                                                       "random --seq-len window) and their peak memory per technique "
                                                       "and sparsity beside the original, global sparse with the first "
                                                       "--share and --budget (GPU numbers count; CPU shows trends)")
    p.add_argument("--narrow-backward", action="store_true",
                   help="with --cost on CUDA: attnlab.ops.sparse.enable_narrow_backward(64) first, so the fwd+bwd rows' "
                        "backward runs the pattern's 64-token blocks instead of 128-token ones (process-wide)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="with --cost on CUDA: each step captured once as a CUDA graph and its replays timed (the "
                        "device work, without the host's Python and launches); the rows also keep what the step itself "
                        "allocates (extra_mem_bytes)")
    p.add_argument("--eager-reference", action="store_true",
                   help="with --cost: also time the original with transformers' eager attention (the T x T matrix "
                        "materialised, as dense attention without a fused kernel keeps it)")
    common.add_model_run_arguments(p, "sparsify", "pattern/, sparsify.json and sparsify.png")
    p.set_defaults(func=run)


def parse_fractions(raw: str) -> list[float]:
    return common.fraction_list("--sparsity", raw, upper_open=True, what="the fraction of blocks pruned")


def run(args) -> int:
    import torch

    from .. import data, models
    from ..reduction import global_sparse as gs
    from ..train.data import TrainWindows, eval_windows

    sparsities = parse_fractions(args.sparsity)
    shares = [s.strip() for s in args.share.split(",") if s.strip()]
    bad = [s for s in shares if s not in gs.SHARES]
    if bad or not shares:
        raise AttnlabError(f"--share {args.share!r}: each must be one of {', '.join(gs.SHARES)}")
    budgets = [b.strip() for b in args.budget.split(",") if b.strip()]
    bad = [b for b in budgets if b not in gs.BUDGETS]
    if bad or not budgets:
        raise AttnlabError(f"--budget {args.budget!r}: each must be one of {', '.join(gs.BUDGETS)}")
    for key, default in SENSITIVITY.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
        elif "sensitivity" not in budgets:
            raise AttnlabError(f"--{key.replace('_', '-')} applies to --budget sensitivity only; --budget is "
                               f"{args.budget!r}")
    if "sensitivity" in budgets:
        if "model" in shares:
            raise AttnlabError("--budget sensitivity divides the blocks between layers: it cannot go with --share model")
        if not 0 <= args.alpha <= 4:
            raise AttnlabError(f"--alpha must be in [0, 4], got {args.alpha}")
        if not 0 < args.probe < 1:
            raise AttnlabError(f"--probe must be in (0, 1), got {args.probe}")
        common.positive_int("--probe-windows", args.probe_windows, 1)
    common.positive_int("--seq-len", args.seq_len, 2)
    given_block = args.block_size
    args.block_size = 64 if given_block is None else given_block
    common.positive_int("--block-size", args.block_size, 1)
    if args.pattern and args.windows is not None:
        raise AttnlabError("--windows: the --pattern is measured already (its windows are in its pattern.json; "
                           "--budget sensitivity's probe takes --probe-windows)")
    if args.pattern and args.data is not None and "sensitivity" not in budgets:
        raise AttnlabError("--data: the --pattern is measured already; corpora are read here only by --budget "
                           "sensitivity's probe")
    args.data = "sotu,brown" if args.data is None else args.data
    args.windows = 16 if args.windows is None else args.windows
    common.positive_int("--windows", args.windows, 1)
    given_sinks = args.sinks
    args.sinks = 4 if given_sinks is None else given_sinks
    common.positive_int("--sinks", args.sinks, 0)
    common.positive_int("--eval-windows", args.eval_windows, 1)
    if not args.pattern and args.block_size > args.seq_len:
        raise AttnlabError(f"--block-size {args.block_size} exceeds --seq-len {args.seq_len}")
    common.check_device(args.device)
    for flag, on in (("--cuda-graph", args.cuda_graph), ("--eager-reference", args.eager_reference)):
        if on and not args.cost:
            raise AttnlabError(f"{flag} changes only the --cost rows: add --cost")
    if args.cuda_graph and not str(args.device).startswith("cuda"):
        raise AttnlabError("--cuda-graph captures CUDA graphs: use it with --device cuda")
    if args.narrow_backward:
        from ..ops.sparse import enable_narrow_backward

        if not args.cost:
            raise AttnlabError("--narrow-backward changes only the --cost rows' backward: add --cost")
        if not str(args.device).startswith("cuda"):
            raise AttnlabError("--narrow-backward is for flex's CUDA backward: use it with --device cuda")
        if not enable_narrow_backward(64):
            raise AttnlabError("--narrow-backward: this torch has no inductor choices hook (see attnlab/ops/sparse.py)")
    corpora = common.name_list(args.data, "--data")
    pattern = None
    if args.pattern:
        pattern = gs.load_pattern(args.pattern)  # a foreign or damaged folder fails here
        if given_block is not None and given_block != pattern.block_size:
            raise AttnlabError(f"--block-size {given_block}: the pattern was measured with {pattern.block_size}-token "
                               "blocks (leave --block-size out with --pattern)")
        args.block_size = pattern.block_size
        if given_sinks is not None and given_sinks != pattern.sinks:
            raise AttnlabError(f"--sinks {given_sinks}: the pattern was measured with {pattern.sinks} sinks (leave "
                               "--sinks out with --pattern)")
        args.sinks = pattern.sinks
        if args.seq_len > pattern.max_len:
            raise AttnlabError(f"--seq-len {args.seq_len} exceeds what the pattern covers ({pattern.max_len} tokens)")
        if ("sensitivity" in budgets and probe_key(args, corpora, shares[0]) != pattern.meta.get("sensitivity_probe")
                and (Path(args.out) / "pattern").resolve() == Path(args.pattern).resolve()):
            raise AttnlabError(f"--budget sensitivity would write its probe into the --pattern folder itself "
                               f"({args.pattern} is OUT/pattern): choose another --out")
    if not args.pattern or "sensitivity" in budgets:  # measured on, or probed on
        data.check_corpora(corpora)
    if args.eval_text != "moby" and not Path(args.eval_text).is_file():
        raise AttnlabError(f"--eval {args.eval_text!r}: no such file (use moby or a UTF-8 text file)")
    path, causal = models.resolve(args.model)
    if not causal:
        raise AttnlabError(f"{args.model!r} is not a causal LM; sparsify evaluates next-token perplexity and KL")
    out = Path(args.out)
    print(f"attnlab sparsify: model={args.model} seq_len={args.seq_len} block={args.block_size} device={args.device}",
          flush=True)
    model, tok = models.load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and args.seq_len > max_pos:
        raise AttnlabError(f"--seq-len {args.seq_len} exceeds the model's max_position_embeddings={max_pos}")
    t0 = time.time()
    if pattern is None:
        windows = TrainWindows(tok, corpora, args.seq_len, args.windows).batch(0, args.windows)
        measured = gs.measure_block_mass(model, windows, block_size=args.block_size, sinks=args.sinks,
                                         progress=not args.no_progress)
        mass = measured.mass
        measured.meta = {"model": args.model, "model_type": model.config.model_type, "corpora": corpora,
                "windows": args.windows, "seq_len": args.seq_len, "tokens": args.windows * args.seq_len,
                "command": common.command_line(), "commit": common.git_commit()}
        pattern_dir = gs.save_pattern(out / "pattern", measured)
        print(f"wrote {pattern_dir} ({mass.shape[0]} layers x {mass.shape[1]} heads x {mass.shape[2]}^2 blocks)")
    else:
        pattern_dir = Path(args.pattern)
        windows = None
    measure_s = time.time() - t0
    if "sensitivity" in budgets:
        pattern_dir = probe(args, model, tok, corpora, pattern_dir, windows, shares[0], out)
    held = eval_windows(tok, None if args.eval_text == "moby" else args.eval_text, args.seq_len, args.eval_windows)
    rows = gs.evaluate(model, held, pattern_dir, sparsities, baseline=not args.no_baseline, shares=shares,
                       budgets=budgets, alpha=args.alpha, progress=not args.no_progress)
    device_name = common.environment(args.device)["device_name"]
    for r in rows:
        r.update(impl="attnlab", device=device_name)
    print()
    print(format_table(rows))
    for note in floor_notes(rows):
        print(note)
    costs = None
    if args.cost:
        costs = gs.cost(model, args.seq_len, pattern_dir, sparsities, baseline=not args.no_baseline,
                        share=shares[0], budget=budgets[0], alpha=args.alpha, progress=not args.no_progress,
                        cuda_graph=args.cuda_graph, eager_reference=args.eager_reference)
        print()
        print(format_cost(costs))
    common.write_result(
        out / "sparsify.json", args.device,
        {"model": args.model, "pattern": str(pattern_dir), "seq_len": args.seq_len, "block_size": args.block_size,
         "eval_windows": args.eval_windows, "eval_text": args.eval_text, "shares": shares, "budgets": budgets,
         "narrow_backward": args.narrow_backward, "cuda_graph": args.cuda_graph,
         "alpha": args.alpha, "measure_s": round(measure_s, 1), "rows": rows,
         "cost": costs, "result_rows": result_rows(rows, costs)},
        None if args.no_plot else lambda png: plot(rows, png, title=f"attnlab sparsify: {args.model}, {args.eval_windows} "
                                                   f"held-out windows x {args.seq_len} tokens, {args.block_size}-token blocks"))
    return 0


def floor_notes(rows: list[dict]) -> list[str]:
    """A line per (share, budget) whose higher sparsities keep exactly what a lower one keeps: past that point only
    the band and the sinks are left, which every sparsity keeps, so the rows above it are the same mask. Otherwise a
    line where global sparse keeps well over what was asked (more than 1.1x 1 - sparsity): that floor, reached."""
    notes = []
    for key in dict.fromkeys((r.get("share"), r.get("budget")) for r in rows if r["technique"] == "global_sparse"):
        rs = sorted((r for r in rows if r["technique"] == "global_sparse" and (r.get("share"), r.get("budget")) == key),
                    key=lambda r: r["fraction"])
        pairs = [(a, b) for a, b in zip(rs, rs[1:]) if abs(a["density"] - b["density"]) < 1e-9]
        # window_sinks rows are matched to global sparse's density: a floor there is global sparse's, noted here
        short = [r for r in rs if r.get("density") is not None and r["density"] > 1.1 * (1 - r["fraction"]) + 1e-3]
        if pairs:
            first = pairs[0][0]
            notes.append(f"note: global sparse ({key[0]}, {key[1] or 'uniform'}) keeps the same "
                         f"{first['density']:.3f} of the causal pairs from {first['fraction']:.0%} on (the band and "
                         f"sinks every sparsity keeps): the rows at {', '.join(format(b['fraction'], '.0%') for _, b in pairs)} "
                         "are that mask again (a longer --seq-len or smaller --block-size prunes further)")
        elif short:
            notes.append(f"note: global sparse ({key[0]}, {key[1] or 'uniform'}) could not prune as asked at "
                         + ", ".join(f"{r['fraction']:.0%} (keeps {r['density']:.3f}, not {1 - r['fraction']:.3f})"
                                     for r in short)
                         + ": the band and sinks every mask keeps are that much of the causal pairs at this length "
                         "(window_sinks is matched to that density)")
    return notes


def probe_key(args, corpora, share) -> dict:
    """What a stored probe was measured with; a stored probe is reused only when this matches."""
    return {"probe": args.probe, "windows": args.probe_windows, "seq_len": args.seq_len, "corpora": corpora,
            "share": share}


def probe(args, model, tok, corpora, pattern_dir, windows, share, out) -> Path:
    """The pattern with its per-layer sensitivity probed on calibration windows (the first --probe-windows of the
    measured ones, or of --data), reused when the pattern already holds one probed the same way. A pattern given
    with --pattern is not changed: the probed copy goes to OUT/pattern."""
    import dataclasses

    from ..reduction import global_sparse as gs
    from ..train.data import TrainWindows

    pat = gs.load_pattern(pattern_dir)
    key = probe_key(args, corpora, share)
    if pat.sensitivity is not None and pat.meta.get("sensitivity_probe") == key:
        print(f"sensitivity: reusing the probe stored in {pattern_dir}")
        return pattern_dir
    if windows is None or len(windows) < args.probe_windows:  # the corpus' first windows either way
        windows = TrainWindows(tok, corpora, args.seq_len, args.probe_windows).batch(0, args.probe_windows)
    t0 = time.time()
    sens = gs.probe_sensitivity(model, windows[:args.probe_windows], pattern_dir, probe=args.probe, share=share,
                                progress=not args.no_progress)
    meta = {**pat.meta, "sensitivity_probe": key}
    dest = gs.save_pattern(out / "pattern", dataclasses.replace(pat, meta=meta, sensitivity=sens))
    print(f"sensitivity (KL with one layer at {args.probe:.0%} pruned, {time.time() - t0:.0f} s): "
          + " ".join(f"{x:.4f}" for x in sens.tolist()) + f"; stored in {dest}")
    return dest


def result_rows(rows: list[dict], costs: list[dict] | None = None) -> list[dict]:
    """The issue's flat schema: one row per (technique, fraction, metric); ms and peak memory from the forward
    cost rows when measured (else ms is the held-out forward's median and the memory None)."""
    def budget_of(opts):
        return None if "share" not in opts else opts.get("budget", "uniform")

    fwd = {(c["technique"], c["fraction"], (c.get("options") or {}).get("share"), budget_of(c.get("options") or {})): c
           for c in costs or () if c["mode"] == "fwd" and c.get("status") == "ok"}
    out = []
    for r in rows:
        c = fwd.get((r["technique"], r["fraction"], r.get("share"), r.get("budget")), {})
        for metric, base in (("ppl", r["ppl_original"]), ("kl", 0.0)):
            out.append({"technique": r["technique"], "share": r.get("share"), "budget": r.get("budget"), "impl": r["impl"], "fraction": r["fraction"], "metric": metric,
                        "value": r[metric], "baseline_value": base, "ms": c.get("ms", r["ms"]),
                        "peak_mem_bytes": c.get("peak_mem_bytes"), "kv_bytes": None, "device": r["device"],
                        "density": r["density"]})
    return out


def format_cost(costs: list[dict]) -> str:
    """Per technique, fraction and mode: ms and peak memory, each also as a ratio to the original model."""
    base = {c["mode"]: c for c in costs if c["technique"] == "original" and c.get("status") == "ok"}
    lines = [f"{'technique':<14} {'pruned':>6} {'mode':>8} {'ms':>9} {'x orig':>7} {'peak MiB':>9} {'x orig':>7}"]
    if any(c.get("cuda_graph") for c in costs):
        lines.insert(0, "(each step captured as a CUDA graph, its replays timed)")
    for c in costs:
        frac = "" if c["fraction"] is None else f"{c['fraction']:.0%}"
        if c.get("status") != "ok":
            lines.append(f"{c['technique']:<14} {frac:>6} {c['mode']:>8} {c.get('status')}: {(c.get('error') or '')[:60]}")
            continue
        b = base.get(c["mode"], {})
        mem = c.get("peak_mem_bytes")
        ratio_t = f"{c['ms'] / b['ms']:.2f}" if b.get("ms") else ""
        ratio_m = f"{mem / b['peak_mem_bytes']:.2f}" if mem and b.get("peak_mem_bytes") else ""
        mib = f"{mem / 2**20:.0f}" if mem else "-"
        lines.append(f"{c['technique']:<14} {frac:>6} {c['mode']:>8} {c['ms']:>9.2f} {ratio_t:>7} {mib:>9} {ratio_m:>7}")
    return "\n".join(lines)


def format_table(rows: list[dict]) -> str:
    head = f"{'technique':<14} {'share':>5} {'budget':>11} {'pruned':>6} {'density':>7} {'ppl':>9} {'(orig)':>8} {'KL':>9} {'KL p95':>8} {'top-1':>6} {'ms':>8}"
    lines = [head]
    for r in rows:
        lines.append(f"{r['technique']:<14} {r.get('share') or '':>5} {r.get('budget') or '':>11} {r['fraction']:>6.0%} {r['density']:>7.3f} {r['ppl']:>9.3f} "
                     f"{r['ppl_original']:>8.3f} {r['kl']:>9.4f} {r['kl_p95']:>8.3f} {r['top1']:>6.3f} {r['ms']:>8.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import save

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    base = rows[0]["ppl_original"]
    kinds = list(dict.fromkeys((r.get("share"), r.get("budget") or "uniform") for r in rows
                               if r["technique"] == "global_sparse"))
    colors = {("layer", "uniform"): "tab:blue", ("head", "uniform"): "tab:green", ("model", "uniform"): "tab:purple",
              ("layer", "sensitivity"): "tab:red", ("head", "sensitivity"): "tab:brown"}
    styles = {("global_sparse", sh, bu): (colors.get((sh, bu), "tab:gray"), "o" if bu == "uniform" else "D",
                                          f"global sparse (measured blocks, budget per {sh}"
                                          + (")" if bu == "uniform" else ", layers by sensitivity)"))
              for sh, bu in kinds}
    sinks = next((r["options"]["sinks"] for r in rows if r["technique"] == "window_sinks"), 0)
    styles[("window_sinks", None, None)] = ("tab:orange", "s", f"window + {sinks} sinks, same density")
    for (tech, share, budget), (color, marker, label) in styles.items():
        rs = sorted((r for r in rows if r["technique"] == tech and r.get("share") == share
                     and (budget is None or (r.get("budget") or "uniform") == budget)), key=lambda r: r["fraction"])
        if not rs:
            continue
        x = [100 * (1 - r["density"]) for r in rs]  # what was really pruned (a requested p past the floor of
        axes[0].plot(x, [r["ppl"] for r in rs], marker=marker, color=color, label=label)  # band + sinks lands there)
        axes[1].plot(x, [r["kl"] for r in rs], marker=marker, color=color, label=label)
    axes[0].axhline(base, color="gray", ls="--", lw=1)
    axes[0].text(0.99, base, f"original model {base:.2f} ", color="gray", fontsize=8, va="bottom", ha="right",
                 transform=axes[0].get_yaxis_transform())
    axes[0].set_ylabel("held-out perplexity")
    axes[1].set_ylabel("KL(original || sparse), nats/token")
    for ax in axes:
        ax.set_xlabel("causal token pairs pruned (%) = 100 x (1 - density)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path, title)
