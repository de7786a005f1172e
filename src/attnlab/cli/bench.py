"""`attnlab bench`: time and memory of attention methods (and their public peers) against sequence length.

    attnlab bench --methods sdpa,window,linear --lengths 1024,4096 --device cuda --dtype bf16 --mode fwd,fwd+bwd

Writes into --out: NAME.json (one row per measurement, written after every row so a killed run keeps what it
measured), NAME.crossover.json (where each method becomes cheaper than SDPA, when SDPA was timed), NAME.png
and NAME.cmd.txt (the command).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..types import AttnlabError
from . import common


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="time and memory of attention methods (and peers) vs sequence length",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="all", help="comma list of attnlab methods (default: every registered one); "
                   "METHOD@BACKEND runs a method with that backend option, beside its default (e.g. window,window@triton)")
    p.add_argument("--lengths", default=None,
                   help="comma list of sequence lengths (default: 1024..65536 on CUDA, 128,256,512 on CPU)")
    p.add_argument("--batch", default="1", help="batch size, or steps like '4,16384:1' (4, then 1 from T=16384)")
    p.add_argument("--heads", type=int, default=16, help="attention heads (default %(default)s)")
    p.add_argument("--head-dim", type=int, default=64, help="head dimension (default %(default)s)")
    p.add_argument("--dtype", default=None, choices=sorted(common.DTYPES),
                   help="input dtype (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--mode", default="fwd", help="fwd | fwd+bwd | fwd,fwd+bwd")
    causal = p.add_mutually_exclusive_group()
    causal.add_argument("--causal", action="store_true", help="causal attention (default: non-causal)")
    causal.add_argument("--both-causal", action="store_true", help="run non-causal and causal")
    p.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    p.add_argument("--peers", default="all", help="all | none | comma list of peer impl names (e.g. linformer,torch.sdpa[flash])")
    common.add_set_argument(p)
    p.add_argument("--warmup", type=int, default=3, help="untimed calls before timing (the first pays compilation)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (median reported)")
    p.add_argument("--row-budget", type=float, default=2.0, help="seconds for one row's timed calls (repeats lowered to fit)")
    p.add_argument("--max-row-seconds", type=float, default=None, help="skip an impl's longer lengths after a row this slow")
    p.add_argument("--time-budget", type=float, default=None, help="soft deadline for the whole sweep, in seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    p.add_argument("--out", default=str(common.default_results_dir("bench")), help="output folder (default: %(default)s)")
    p.add_argument("--name", default=None, help="file stem (default: bench_<mode>_<causal|noncausal>)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    import attnlab

    from ..bench import harness, plot as plot_mod
    from ..bench.sweep import parse_batch, run_sweep

    started = time.perf_counter()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    common.check_device(device)
    on_cpu = torch.device(device).type == "cpu"
    methods = attnlab.registry.standalone_methods() if args.methods == "all" else common.name_list(args.methods)
    from ..bench import peers as peers_mod
    from ..bench.sweep import split_spec

    for m in methods:
        attnlab.registry.get(split_spec(m)[0])  # unknown names: one line listing the valid ones
        if args.causal and args.methods != "all" and not attnlab.registry.capabilities(split_spec(m)[0]).causal:
            raise AttnlabError(f"method {split_spec(m)[0]!r} cannot do causal attention: leave it out of --methods, "
                               "or time it non-causal (no --causal; --both-causal times it non-causal only)")
    modes = [m.strip() for m in args.mode.split(",")]
    if any(m not in harness.MODES for m in modes):
        raise AttnlabError(f"--mode must be fwd, fwd+bwd or both, got {args.mode!r}")
    if args.peers not in ("all", "none"):
        known = sorted({p.impl for p in peers_mod.PEERS})
        wanted = common.name_list(args.peers, "--peers")
        args.peers = ",".join(wanted)  # as the sweep filters them: "a, b" must not drop b
        unknown = [x for x in wanted if x not in known]
        if unknown:
            raise AttnlabError(f"--peers: unknown peer {unknown[0]!r}; all, none or a comma list of {', '.join(known)}")
    for flag, value in (("--time-budget", args.time_budget), ("--row-budget", args.row_budget),
                        ("--max-row-seconds", args.max_row_seconds)):
        if value is not None and not value > 0:
            raise AttnlabError(f"{flag} must be a positive number of seconds, got {value}")
    if args.name is not None and (not args.name.strip() or "/" in args.name or args.name in (".", "..")):
        raise AttnlabError(f"--name {args.name!r}: a file stem (letters, digits, -_.), not empty and not a path")
    lengths_arg = args.lengths if args.lengths is not None else ("128,256,512" if on_cpu else
                                                                 "1024,2048,4096,8192,16384,32768,65536")
    try:
        lengths = [int(x) for x in lengths_arg.split(",") if x.strip()]
    except ValueError:
        raise AttnlabError(f"--lengths expects comma-separated integers, got {lengths_arg!r}") from None
    if not lengths or any(t < 1 for t in lengths):
        raise AttnlabError(f"--lengths must be positive integers, got {lengths_arg!r}")
    for name in ("heads", "head_dim", "warmup", "repeats"):
        common.positive_int("--" + name.replace("_", "-"), getattr(args, name), 0 if name == "warmup" else 1)
    parse_batch(args.batch)
    overrides = common.parse_overrides(args.overrides, [split_spec(m)[0] for m in methods])
    for spec in methods:  # option names and values (and options a method cannot do without) fail here, in one line
        m, backend = split_spec(spec)
        attnlab.registry.check_options(m, attnlab.registry.options_at(
            m, lengths[0], {**overrides.get(m, {}), **({"backend": backend} if backend else {})}))
    dtype = common.DTYPES[args.dtype or ("fp32" if on_cpu else "bf16")]
    causal_list = [False, True] if args.both_causal else [bool(args.causal)]
    if "sdpa" not in methods:
        methods = ["sdpa"] + methods  # the crossover needs the SDPA baseline timed in the same run
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or "bench_{}_{}".format(
        "-".join(modes).replace("+", ""), "both" if args.both_causal else ("causal" if args.causal else "noncausal"))
    command = getattr(args, "command", None) or common.command_line()
    (out_dir / f"{name}.cmd.txt").write_text(command + "\n")
    json_path = out_dir / f"{name}.json"
    rows = run_sweep(
        methods=methods, lengths=lengths, batch=args.batch, heads=args.heads, head_dim=args.head_dim, dtype=dtype,
        modes=modes, causal_list=causal_list, device=device, repeats=args.repeats, warmup=args.warmup,
        peers=args.peers, overrides=overrides, out_path=json_path, time_budget_s=args.time_budget,
        row_budget_s=args.row_budget, max_row_s=args.max_row_seconds, seed=args.seed, progress=not args.no_progress,
        command=command, started=started,
    )
    entries = plot_mod.crossover(rows)
    (out_dir / f"{name}.crossover.json").write_text(json.dumps(entries, indent=1))
    if not args.no_plot:
        try:
            plot_mod.plot(rows, out_dir / f"{name}.png")
        except ImportError as e:
            print(f"attnlab bench: no plot ({e}); rows are in {json_path}")
    print(summary(rows))
    print(plot_mod.crossover_table(entries))
    print(f"wrote {json_path} ({len(rows)} rows) in {time.perf_counter() - started:.0f} s")
    return 0


def summary(rows: list[dict]) -> str:
    lines = [f"{'mode':8} {'causal':6} {'method':13} {'impl':22} {'kernel':18} {'T':>6} {'B':>2} {'status':17} "
             f"{'ms':>10} {'peak MiB':>9}"]
    reasons: list[str] = []  # why a row was not measured, once per distinct reason, under the table
    for r in rows:
        ms = f"{r['ms']:.3f}" if r.get("ms") is not None else "-"
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") else "-"
        status = r["status"]
        if status != "ok" and r.get("error"):
            if r["error"] not in reasons:
                reasons.append(r["error"])
            status += f" [{reasons.index(r['error']) + 1}]"
        lines.append(f"{r['mode']:8} {str(r['causal']):6} {r['method']:13} {r['impl']:22} {str(r.get('kernel') or '-'):18} "
                     f"{r['seq_len']:>6} {r['batch']:>2} {status:17} {ms:>10} {mem:>9}")
    return "\n".join(lines + [f"[{i}] {why}" for i, why in enumerate(reasons, 1)])
