"""`attnlab bench`: time and memory of every method (and its peers) against sequence length.

    attnlab bench --methods sdpa,nystrom,window --lengths 1024,2048,4096 --batch 4,16384:1 --heads 16 \
        --head-dim 64 --dtype bf16 --mode fwd,fwd+bwd --causal --device cuda --out benchmarks/results/x

Writes into --out: NAME.json (one row per measurement, written after every row so a killed run keeps
what it measured), NAME.crossover.json (where each method becomes cheaper than SDPA), NAME.png and
NAME.cmd.txt (the command). Wired as a subcommand through `add_parser(subparsers)` + `run(args)`;
also runnable as `python -m attnlab.bench.cli ...`.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from . import harness, peers as peers_mod, plot as plot_mod

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64}

# Long-sequence defaults: (candidate option names, value or f(seq_len)). The first name the method
# declares is used; a logical option no name matches is reported in the row's `note`, never guessed.
LONG_DEFAULTS: dict[str, list[tuple[tuple[str, ...], object]]] = {
    "window": [(("window", "window_size"), 256)],
    "nystrom": [(("num_landmarks", "landmarks"), lambda t: min(64, t))],
    "performer": [(("num_features", "nb_features", "features"), 256)],
    "rfa": [(("num_features", "features"), 256)],
    "linformer": [(("proj_len", "k", "proj_dim"), lambda t: min(256, t)), (("max_len", "seq_len"), lambda t: t)],
    "lsh": [(("bucket_size",), 64), (("n_hashes", "num_hashes"), 2)],
    # BigBird recipe (1 global, 3-block band, random blocks) is the method's own default; only the block grows.
    "block_sparse": [(("block_size",), 128)],
}
# On CPU the sparse methods run their plain-PyTorch path (no FlexAttention compile).
CPU_DEFAULTS: dict[str, dict] = {"window": {"backend": "torch"}, "block_sparse": {"backend": "torch"}}


def method_options(method: str, seq_len: int, device: str, overrides: dict | None = None) -> tuple[dict, list[str]]:
    """(options for attnlab.make, notes about defaults that did not apply) at one length."""
    import attnlab

    declared = attnlab.options(method)
    opts, notes = {}, []
    for names, value in LONG_DEFAULTS.get(method, []):
        name = next((n for n in names if n in declared), None)
        if name is None:
            notes.append(f"default {names[0]}={value if not callable(value) else 'f(T)'} not applied: "
                         f"{method} declares none of {names}")
            continue
        opts[name] = value(seq_len) if callable(value) else value
    if torch.device(device).type == "cpu":
        for name, value in CPU_DEFAULTS.get(method, {}).items():
            if name in declared:
                opts[name] = value
    for name, value in (overrides or {}).items():
        if name not in declared:
            raise attnlab.OptionError(f"--option {method}.{name}: {method} has no option {name!r}; "
                                      f"valid: {', '.join(sorted(declared))}")
        opts[name] = value
    return opts, notes


def parse_batch(spec: str) -> list[tuple[int, int]]:
    """'4,16384:1' -> [(0, 4), (16384, 1)]: batch 4, and 1 from length 16384 on."""
    steps = []
    for part in str(spec).split(","):
        part = part.strip()
        if ":" in part:
            t, b = part.split(":")
            steps.append((int(t), int(b)))
        else:
            steps.append((0, int(part)))
    return sorted(steps)


def batch_at(steps: list[tuple[int, int]], seq_len: int) -> int:
    b = steps[0][1]
    for t, bb in steps:
        if seq_len >= t:
            b = bb
    return b


def parse_overrides(items: list[str] | None) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items or []:
        key, _, raw = item.partition("=")
        method, _, name = key.partition(".")
        if not name or not raw:
            raise SystemExit(f"--option expects METHOD.NAME=VALUE, got {item!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        out.setdefault(method, {})[name] = value
    return out


def environment(device: str) -> dict:
    import attnlab

    dev = torch.device(device)
    env = {
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "attnlab_version": attnlab.__version__,
        "triton_version": None,
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import triton

        env["triton_version"] = triton.__version__
    except Exception:  # noqa: BLE001 - absent on CPU builds
        pass
    return env


# ---- what one "implementation" is: attnlab's method or a peer, built once per length ---------------------

@dataclasses.dataclass
class Impl:
    method: str
    impl: str  # "attnlab" or the peer package
    peer: peers_mod.Peer | None = None

    def build(self, seq_len, heads, head_dim, causal, dtype, device, options):
        """-> (fn, make_inputs adapter, params, note). Raises Unsupported / NotInstalled / AttnlabError."""
        if self.peer is None:
            import attnlab

            m = attnlab.make(self.method, head_dim=head_dim, num_heads=heads, **options)
            why = m.unsupported_reasons(causal=causal, dtype=dtype, tq=seq_len, tk=seq_len)
            if why:
                raise harness.Unsupported(f"{self.method}: " + "; ".join(why))
            m = m.to(device=device, dtype=dtype)
            return (lambda q, k, v: m(q, k, v, causal=causal)[0]), None, list(m.parameters()), ""
        fn = self.peer.factory(seq_len, heads, head_dim, causal, dtype, device, **options)
        prepare = getattr(fn, "prepare", None)
        params = fn.parameters() if hasattr(fn, "parameters") else []
        note = getattr(fn, "note", "") or self.peer.note
        return fn, prepare, params, note


def plan_impls(methods: list[str], peer_sel: str, peer_list: list[peers_mod.Peer] | None = None) -> list[Impl]:
    peer_list = peers_mod.PEERS if peer_list is None else peer_list
    wanted = None if peer_sel in ("all", "") else set() if peer_sel == "none" else set(peer_sel.split(","))
    # Priority under a time budget: the SDPA baseline first, then attnlab's methods, then the peers.
    ordered = sorted(methods, key=lambda m: m != "sdpa")
    out = [Impl(m, "attnlab") for m in ordered]
    chosen = [p for m in ordered for p in peers_mod.peers_for(m, peer_list) if wanted is None or p.impl in wanted]
    out += [Impl(p.method, p.impl, p) for p in sorted(chosen, key=peers_mod.slow_start_rank)]
    return out


def make_inputs_fn(batch, heads, seq_len, head_dim, dtype, device, seed):
    def make():
        g = torch.Generator(device=device).manual_seed(seed + seq_len)
        shape = (batch, heads, seq_len, head_dim)  # (B, H, T, D), the same values for every impl
        return tuple(torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(3))

    return make


def run_sweep(
    *,
    methods: list[str],
    lengths: list[int],
    batch: str | int = 1,
    heads: int = 16,
    head_dim: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    modes: list[str] = ("fwd",),
    causal_list: list[bool] = (False,),
    device: str = "cuda",
    repeats: int = 10,
    warmup: int = 3,
    peers: str = "all",
    peer_list: list[peers_mod.Peer] | None = None,
    overrides: dict[str, dict] | None = None,
    out_path: str | Path | None = None,
    time_budget_s: float | None = None,
    row_budget_s: float | None = 2.0,
    max_row_s: float | None = None,
    seed: int = 0,
    progress: bool = True,
    command: str = "",
    started: float | None = None,
) -> list[dict]:
    """Every (causal, mode, method/impl, length) row. A failing row never stops the sweep.

    time_budget_s: the whole sweep's soft deadline. Each (causal, mode, impl) gets a fair share of what
    is left, lengths run shortest first, and lengths past the share are recorded as "skipped".
    max_row_s: a row that took longer (compile included) skips that impl's longer lengths.
    After an OOM the impl's longer lengths are recorded as "skipped" (they would OOM too).
    """
    from tqdm.auto import tqdm

    started = time.perf_counter() if started is None else started
    _raise_recompile_limit()
    deadline = None if time_budget_s is None else started + time_budget_s
    steps = parse_batch(str(batch))
    lengths = sorted(lengths)
    impls = plan_impls(methods, peers, peer_list)
    env = environment(device)
    dtype_name = str(dtype).removeprefix("torch.")
    groups = [(c, mode, im) for c in causal_list for mode in modes for im in impls]
    rows: list[dict] = []
    bar = tqdm(total=len(groups) * len(lengths), disable=not progress, unit="row", dynamic_ncols=True,
               mininterval=0.1 if sys.stderr.isatty() else 5.0)
    for gi, (causal, mode, im) in enumerate(groups):
        g_start = time.perf_counter()
        share = None if deadline is None else max(0.0, (deadline - g_start) / (len(groups) - gi))
        stop_reason = None
        warm_s = 0.0  # the first two rows pay compilation (static, then dynamic shapes): not counted in the share
        for t in lengths:
            b = batch_at(steps, t)
            bar.set_postfix_str(f"{mode} {'causal' if causal else 'full'} {im.method}[{im.impl}] T={t}")
            row = {
                "method": im.method, "impl": im.impl, "options": {}, "seq_len": t, "batch": b, "heads": heads,
                "head_dim": head_dim, "mode": mode, "causal": causal, "dtype": dtype_name,
                "device": torch.device(device).type, **env, "note": "", **harness.result_fields(device),
            }
            now = time.perf_counter()
            if stop_reason is None and deadline is not None and now > deadline:
                stop_reason = "time budget of the sweep exhausted"
            if stop_reason is None and share is not None and t not in lengths[:2] and now - g_start - warm_s > share:
                stop_reason = f"this impl's share of the time budget ({share:.0f} s) was spent"
            if stop_reason is not None:
                row.update(status="skipped", error=f"not run: {stop_reason}", ms=None)
            else:
                row.update(_measure(im, t, b, heads, head_dim, dtype, device, causal, mode, repeats, warmup,
                                    overrides or {}, row_budget_s, seed))
                if t in lengths[:2]:
                    warm_s += row.get("wall_s", 0.0)
                if row["status"] == "oom":
                    stop_reason = f"out of memory at seq_len={t}"
                elif max_row_s is not None and row.get("wall_s", 0) > max_row_s:
                    stop_reason = f"seq_len={t} took {row['wall_s']:.0f} s > --max-row-seconds {max_row_s:.0f}"
            row["tflops"] = None
            row["flops"] = harness.dense_flops(b, heads, t, head_dim, mode, causal)
            if row.get("status") == "ok" and row.get("ms"):
                row["tflops"] = round(row["flops"] / (row["ms"] * 1e-3) / 1e12, 3)
            row["flops_convention"] = ("dense-equivalent 4*B*H*T^2*D fwd, /2 causal, x3.5 fwd+bwd "
                                       "(effective for approximate methods)")
            row["command"] = command
            row["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            rows.append(row)
            bar.update(1)
            if out_path is not None:
                _write_json(out_path, rows)
    bar.close()
    return rows


def _raise_recompile_limit(limit: int = 256) -> None:
    """A sweep compiles flex_attention for many (impl, length, batch, grad mode) variants; at torch's default
    limit (8 per function) dynamo silently falls back to eager flex, which builds the dense matrix and
    turns a sparse kernel into an OOM. Raise the limits for the benchmark process only."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4 * limit))


def _measure(im, t, b, heads, head_dim, dtype, device, causal, mode, repeats, warmup, overrides, row_budget_s, seed):
    extra: dict = {}
    fn = None
    try:
        try:
            options, notes = method_options(im.method, t, device, overrides.get(im.method))
        except Exception:  # noqa: BLE001 - the method itself may be missing; a peer can still run
            if im.peer is None:
                raise
            options, notes = {}, []
        extra["options"] = _jsonable(options)
        fn, prepare, params, note = im.build(t, heads, head_dim, causal, dtype, device, options)
        extra["note"] = "; ".join([note] + notes if note else notes)
    except Exception as exc:  # noqa: BLE001 - a row, not a crash
        fn = None
        failed = harness.failed_row(exc, device)
        del exc
        harness.free_memory(device)
        return {**extra, **failed}
    base = make_inputs_fn(b, heads, t, head_dim, dtype, device, seed)
    make = base if prepare is None else (lambda: prepare(*base()))
    result = harness.bench_one(fn, make, mode, device, repeats=repeats, warmup=warmup,
                               row_budget_s=row_budget_s, params=params)
    del fn, params
    if result["status"] != "ok":
        harness.free_memory(device)  # bench_one already did; the module and peer state are gone only now
    elif torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # no gc.collect on the happy path: it costs ~0.1 s a row
    return {**extra, **result}


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)) for k, v in obj.items()}


def _write_json(path, rows) -> None:
    path = Path(path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=1))
    os.replace(tmp, path)


# ---- argparse -----------------------------------------------------------------------------------------------

def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="time and memory of attention methods (and peers) vs sequence length",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="all", help="comma list of attnlab methods (default: every registered one)")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768,65536", help="comma list of sequence lengths")
    p.add_argument("--batch", default="1", help="batch size, or steps like '4,16384:1' (4, then 1 from T=16384)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--mode", default="fwd", help="fwd | fwd+bwd | fwd,fwd+bwd")
    causal = p.add_mutually_exclusive_group()
    causal.add_argument("--causal", action="store_true", help="causal attention (default: non-causal)")
    causal.add_argument("--both-causal", action="store_true", help="run non-causal and causal")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peers", default="all", help="all | none | comma list of peer impl names (e.g. linformer,torch.sdpa[flash])")
    p.add_argument("--option", action="append", metavar="METHOD.NAME=VALUE", help="override a method option (repeatable)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--row-budget", type=float, default=2.0, help="seconds for one row's timed calls (repeats lowered to fit)")
    p.add_argument("--max-row-seconds", type=float, default=None, help="skip an impl's longer lengths after a row this slow")
    p.add_argument("--time-budget", type=float, default=None, help="soft deadline for the whole sweep, in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/bench", help="output directory")
    p.add_argument("--name", default=None, help="file stem (default: bench_<mode>_<causal|noncausal>)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    import attnlab

    started = time.perf_counter()
    methods = attnlab.list_methods() if args.methods in ("all", "") else [m.strip() for m in args.methods.split(",") if m.strip()]
    known = set(attnlab.list_methods())
    unknown = [m for m in methods if m not in known]
    if unknown:
        print(f"attnlab bench: unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(known))}",
              file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.mode.split(",")]
    bad = [m for m in modes if m not in harness.MODES]
    if bad:
        print(f"attnlab bench: --mode must be fwd, fwd+bwd or both, got {args.mode!r}", file=sys.stderr)
        return 2
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("attnlab bench: --device cuda but no CUDA device is visible; use --device cpu", file=sys.stderr)
        return 2
    causal_list = [False, True] if args.both_causal else [bool(args.causal)]
    lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or "bench_{}_{}".format(
        "-".join(modes).replace("+", ""), "both" if args.both_causal else ("causal" if args.causal else "noncausal"))
    argv0 = sys.argv[0]
    prog = "python -m attnlab.bench.cli" if argv0.endswith(("bench/cli.py", "bench\\cli.py")) else Path(argv0).name
    command = getattr(args, "command", None) or (prog + " " + shlex.join(sys.argv[1:]))
    (out_dir / f"{name}.cmd.txt").write_text(command + "\n")
    json_path = out_dir / f"{name}.json"
    rows = run_sweep(
        methods=methods, lengths=lengths, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
        dtype=DTYPES[args.dtype], modes=modes, causal_list=causal_list, device=args.device, repeats=args.repeats,
        warmup=args.warmup, peers=args.peers, overrides=parse_overrides(args.option), out_path=json_path,
        time_budget_s=args.time_budget, row_budget_s=args.row_budget, max_row_s=args.max_row_seconds,
        seed=args.seed, progress=not args.no_progress, command=command, started=started,
    )
    entries = plot_mod.crossover(rows)
    (out_dir / f"{name}.crossover.json").write_text(json.dumps(entries, indent=1))
    if not args.no_plot:
        try:
            plot_mod.plot(rows, out_dir / f"{name}.png")
        except ImportError as e:
            print(f"attnlab bench: no plot ({e}); rows are in {json_path}", file=sys.stderr)
    print(summary(rows))
    print(plot_mod.crossover_table(entries))
    print(f"wrote {json_path} ({len(rows)} rows) in {time.perf_counter() - started:.0f} s")
    return 0


def summary(rows: list[dict]) -> str:
    lines = [f"{'mode':8} {'causal':6} {'method':13} {'impl':22} {'T':>6} {'B':>2} {'status':13} {'ms':>10} {'peak MiB':>9} {'TFLOP/s':>8}"]
    for r in rows:
        ms = f"{r['ms']:.3f}" if r.get("ms") is not None else "-"
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f}" if r.get("peak_mem_bytes") else "-"
        tf = f"{r['tflops']:.1f}" if r.get("tflops") is not None else "-"
        lines.append(f"{r['mode']:8} {str(r['causal']):6} {r['method']:13} {r['impl']:22} {r['seq_len']:>6} "
                     f"{r['batch']:>2} {r['status']:13} {ms:>10} {mem:>9} {tf:>8}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="attnlab bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    if argv is not None:  # called from Python: record these arguments, not the host process's
        args.command = "python -m attnlab.bench.cli " + shlex.join(argv)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
