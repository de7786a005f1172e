"""`attnlab advise`: the cheapest per-layer spec within a KL budget, from a per-layer scan, verified on the whole
model; the frontier plot, JSON and the spec that `attnlab compare --spec` / `attnlab distill --spec` take."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..types import AttnlabError
from . import common


def add_parser(sub) -> None:
    p = sub.add_parser("advise", help="which attention each layer should use: cheapest spec within a KL budget",
                       description="Scan each method one layer at a time (or read a scan.json), time one attention "
                                   "layer of each method at --cost-len on --device, walk a greedy path from the "
                                   "original model to every layer switched (most attention time saved per unit of "
                                   "scanned KL first), verify points of it on the whole mixed model, and recommend "
                                   "the cheapest one whose held-out KL is within --max-kl. Writes advise.json, "
                                   "advise.png and spec.json (a SwapSpec for compare --spec / distill --spec).")
    p.add_argument("--model", default="smollm2", help="a packaged causal LM (smollm2) or a local model folder")
    p.add_argument("--methods", default="window,linear,performer",
                   help="comma-separated candidate methods, each with its defaults at --seq-len (default: %(default)s)")
    common.add_set_argument(p)
    p.add_argument("--max-kl", type=float, default=0.05, help="held-out KL budget, nats/token (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per held-out window (default: %(default)s)")
    p.add_argument("--num-tokens", type=int, default=1024, help="held-out tokens (windows = num_tokens / seq_len) "
                                                               "(default: %(default)s)")
    p.add_argument("--cost-len", type=int, default=None, help="sequence length the attention cost is timed at "
                                                              "(default: --seq-len)")
    p.add_argument("--cost-from", default=None, metavar="BENCH.json",
                   help="read the attention costs from committed `attnlab bench` rows (e.g. the H200/H100 sweeps "
                        "under benchmarks/results/) instead of timing them on --device; the ratios carry over, "
                        "the benchmark's shape is said in the output")
    p.add_argument("--scan", default=None, metavar="SCAN.json", help="reuse an `attnlab scan` result (same model, "
                                                                      "methods and options) instead of scanning")
    p.add_argument("--points", type=int, default=6, help="path points verified on the whole model, besides the "
                                                        "budget search (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="the spec seed random methods draw per-layer seeds from")
    common.add_model_run_arguments(p, "advise", "advise.json, advise.png and spec.json")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from .. import models, registry
    from ..adapters.spec import ORIGINAL
    from ..advice.advise import advise, attention_costs, costs_from_rows, plot, wide_spread
    from ..advice.scan import scan
    from ..train.data import eval_windows

    common.positive_int("--seq-len", args.seq_len, 2)
    opts = common.causal_method_options(args.methods, args.overrides, args.seq_len)
    methods = list(opts)
    if not args.max_kl > 0:
        raise AttnlabError(f"--max-kl must be > 0, got {args.max_kl}")
    common.positive_int("--num-tokens", args.num_tokens, 2)
    common.positive_int("--points", args.points, 1)
    cost_len = args.seq_len if args.cost_len is None else args.cost_len
    common.positive_int("--cost-len", cost_len, 2)
    if args.num_tokens < args.seq_len:
        raise AttnlabError(f"--num-tokens {args.num_tokens} is less than one window of --seq-len {args.seq_len}")
    common.check_device(args.device)
    costs = costs_from_rows(args.cost_from, methods, seq_len=cost_len) if args.cost_from else None  # before loading
    scan_rows = None
    if args.scan:
        scanned, scan_rows = read_scan(args.scan)
        if scanned.get("model") != args.model or scanned.get("seq_len") != args.seq_len:
            raise AttnlabError(f"--scan {args.scan!r} was made for model {scanned.get('model')!r} at seq_len "
                               f"{scanned.get('seq_len')}, not {args.model!r} at {args.seq_len}")
        # advise verifies on the held-out tail with --seed: a scan of another text, seed or window count is
        # another measurement, and its KLs would not be comparable with the verified ones
        windows_here = max(1, args.num_tokens // args.seq_len)
        theirs = {"text": scanned.get("text"), "seed": scanned.get("seed"), "windows": scanned.get("windows")}
        ours = {"text": "moby (held-out tail)", "seed": args.seed, "windows": windows_here}
        differ = [f"{k} {theirs[k]!r} (here {ours[k]!r})" for k in ours if theirs[k] is not None and theirs[k] != ours[k]]
        if differ:
            raise AttnlabError(f"--scan {args.scan!r} was measured with {', '.join(differ)}: rescan, or match "
                               "--seed / --num-tokens")
        missing = [m for m in methods if not any(r["method"] == m and registry.options_at(m, args.seq_len, r["options"])
                                                 == opts[m] for r in scan_rows)]
        if missing:
            raise AttnlabError(f"--scan {args.scan!r} has no rows for {missing} with the options asked for; rescan "
                               "or match --methods / --set")
        scan_rows = [r for r in scan_rows if r["method"] in methods]
    skeleton, causal = models.skeleton(args.model)
    if not causal:
        raise AttnlabError(f"{args.model!r} is not a causal LM; advise measures next-token KL")
    models.check_seq_len(skeleton, args.seq_len)
    print(f"attnlab advise: model={args.model} methods={','.join(methods)} max_kl={args.max_kl} seq_len={args.seq_len} "
          f"cost at {cost_len} tokens {'from ' + args.cost_from if args.cost_from else 'on ' + args.device}", flush=True)
    t0 = time.time()
    model, tok = models.load(args.model, dtype=getattr(torch, args.dtype), device=args.device)
    windows = eval_windows(tok, None, args.seq_len, max(1, args.num_tokens // args.seq_len))
    if scan_rows is None:
        scan_rows = scan(model, windows, opts, seed=args.seed, progress=not args.no_progress)
    if costs is None:
        costs = attention_costs(model, opts, seq_len=cost_len)
        spread = wide_spread(costs)
        if spread:
            print(f"note: the attention timings varied widely between calls ({'; '.join(spread)}; median of "
                  f"{costs[ORIGINAL]['repeats']}): this machine is busy, and the recommendation may change on a rerun "
                  "(--cost-from reads committed GPU rows instead)", flush=True)
    result = advise(model, windows, scan_rows, costs, opts, max_kl=args.max_kl, points=args.points, seed=args.seed,
                    progress=not args.no_progress)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rec = result["recommended"]
    stale = out / "spec.json"
    if rec is None and stale.is_file():  # an earlier run's recommendation must not sit beside this result
        stale.unlink()
        print(f"removed {stale}: an earlier run's recommendation; this run recommends none")
    print()
    print(format_table(result, costs))
    print()
    if len(result["path"]) == 1:
        print(f"No candidate method is cheaper than the original attention at {cost_len} tokens on {args.device}: "
              "keep the original (or time a longer --cost-len).")
    elif rec is None:
        print(f"No layer can switch within KL {args.max_kl}: keep the original attention (or raise --max-kl).")
    else:
        (out / "spec.json").write_text(json.dumps(rec["spec"], indent=2))
        best_single = min((s for s in result["singles"] if s["kl"] <= args.max_kl), key=lambda s: s["ms"], default=None)
        beside = ("no single method in every layer is within the budget" if best_single is None else
                  f"the best single method within it, {best_single['method']}, takes {best_single['time_ratio']:.2f}x")
        chosen = list(rec["assign"].values())
        mix = ", ".join(f"{m} x{chosen.count(m)}" for m in methods if m in chosen)
        where = (f"{costs[ORIGINAL]['device_name']} (from {args.cost_from})" if args.cost_from else args.device)
        print(f"Recommendation: switch {rec['switched']} of {len(chosen)} layers ({mix}): "
              f"attention time {rec['time_ratio']:.2f}x the original's at {cost_len} tokens on {where}, held-out KL {rec['kl']:.4f} "
              f"(budget {args.max_kl}); {beside}. Spec: {out / 'spec.json'} (attnlab compare --spec, distill --spec).")
    shape = costs[ORIGINAL].get("shape") or {}
    where = (f"{costs[ORIGINAL]['device_name']} (rows of {Path(args.cost_from).name}: {shape.get('heads')} heads x "
             f"{shape.get('head_dim')}, batch {shape.get('batch')})" if args.cost_from
             else common.environment(args.device)["device_name"])
    common.write_result(
        out / "advise.json", args.device,
        {"model": args.model, "seq_len": args.seq_len, "windows": len(windows), "cost_len": cost_len,
         "cost_source": where,
         "max_kl": args.max_kl, "methods": opts, "costs": costs, "elapsed_s": round(time.time() - t0, 1),
         **result, "scan": scan_rows},
        None if args.no_plot else lambda png: plot(result, args.max_kl, png, title=(
            f"attnlab advise: {args.model}, {len(windows)} held-out windows x {args.seq_len} tokens;\nattention timed at "
            f"{cost_len} tokens on {where}")))
    return 0


def read_scan(path) -> tuple[dict, list[dict]]:
    """(scan.json's fields, its rows) of an `attnlab scan` result; anything else is one error line."""
    try:
        scanned = json.loads(Path(path).read_text())
        rows = scanned["rows"]
        if not isinstance(rows, list) or not rows:
            raise TypeError("rows is not a non-empty list")
        for r in rows:
            if not (isinstance(r.get("method"), str) and isinstance(r.get("options"), dict)
                    and isinstance(r.get("layer"), int) and isinstance(r.get("kl"), (int, float))):
                raise TypeError(f"a row lacks method, options, layer or kl: {json.dumps(r)[:120]}")
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise AttnlabError(f"--scan {path!r}: not a readable scan.json ({type(e).__name__}: {e})") from None
    return scanned, rows


def format_table(result: dict, costs: dict) -> str:
    lines = [f"{'choice':<28} {'layers switched':>15} {'KL (scan sum)':>13} {'KL measured':>11} {'top-1':>6} {'time x':>7}"]
    for v in result["verified"]:
        lines.append(f"{'path step ' + str(v['step']):<28} {v['switched']:>15} {v['kl_est']:>13.4f} {v['kl']:>11.4f} "
                     f"{v['top1']:>6.3f} {v['time_ratio']:>7.2f}")
    for s in result["singles"]:
        lines.append(f"{s['method'] + ' in every layer':<28} {'all':>15} {'':>13} {s['kl']:>11.4f} {s['top1']:>6.3f} "
                     f"{s['time_ratio']:>7.2f}")
    lines.append("one layer, ms: " + ", ".join(f"{m} {c['ms']:.3g}" for m, c in costs.items()))
    return "\n".join(lines)
