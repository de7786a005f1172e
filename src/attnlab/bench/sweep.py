"""The cost sweep behind `attnlab bench`: every (causal, mode, method or peer, length) row, time and memory.

    from attnlab.bench import run_sweep
    rows = run_sweep(methods=["sdpa", "window"], lengths=[1024, 4096], device="cuda", out_path="x.json")

Options of each attnlab method come from the method itself (`Method.defaults(seq_len)`), with `--set`
overrides on top; each row records the options and the kernel that ran (`kernel`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import harness, peers as peers_mod
from ..ops.fused import raise_recompile_limit

def method_options(method: str, seq_len: int, overrides: dict | None = None) -> dict:
    """The method's own options at this length, `--set` overrides on top (unknown names are an error)."""
    from .. import registry

    opts = registry.options_at(method, seq_len, overrides)
    registry.check_options(method, opts)
    return opts


def parse_batch(spec: str) -> list[tuple[int, int]]:
    """'4,16384:1' -> [(0, 4), (16384, 1)]: batch 4, and 1 from length 16384 on."""
    from ..types import AttnlabError

    steps = []
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if ":" in part:
                t, b = part.split(":")
                steps.append((int(t), int(b)))
            else:
                steps.append((0, int(part)))
        except ValueError:
            raise AttnlabError(f"--batch {spec!r}: expected N or steps like '4,16384:1'") from None
    if not steps or any(b < 1 or t < 0 for t, b in steps):
        raise AttnlabError(f"--batch {spec!r}: batch sizes must be >= 1")
    return sorted(steps)


def batch_at(steps: list[tuple[int, int]], seq_len: int) -> int:
    b = steps[0][1]
    for t, bb in steps:
        if seq_len >= t:
            b = bb
    return b


# ---- what one "implementation" is: attnlab's method or a peer, built once per length ---------------------

@dataclasses.dataclass
class Impl:
    method: str
    impl: str  # "attnlab", "attnlab@<backend>" (a method run with a chosen backend) or the peer package
    peer: peers_mod.Peer | None = None
    backend: str | None = None  # "window@triton": the backend option set on top of the method's options

    def build(self, seq_len, heads, head_dim, causal, dtype, device, options):
        """-> (fn, make_inputs adapter, params, note, module | None). Raises Unsupported / NotInstalled /
        AttnlabError."""
        if self.peer is None:
            import attnlab

            m = attnlab.make(self.method, head_dim=head_dim, num_heads=heads, **options)
            why = m.unsupported_reasons(causal=causal, dtype=dtype, tq=seq_len, tk=seq_len, device=device)
            if why:
                raise harness.Unsupported(f"{self.method}: " + "; ".join(why))
            m = m.to(device=device, dtype=dtype)
            return (lambda q, k, v: m(q, k, v, causal=causal)[0]), None, list(m.parameters()), "", m
        fn = self.peer.factory(seq_len, heads, head_dim, causal, dtype, device, **options)
        prepare = getattr(fn, "prepare", None)
        params = fn.parameters() if hasattr(fn, "parameters") else []
        note = getattr(fn, "note", "") or self.peer.note
        return fn, prepare, params, note, None


def split_spec(spec: str) -> tuple[str, str | None]:
    """"window@triton" -> ("window", "triton"): a method and the backend it is run with (None: its default)."""
    name, _, backend = spec.partition("@")
    return name, backend or None


def plan_impls(methods: list[str], peer_sel: str, peer_list: list[peers_mod.Peer] | None = None) -> list[Impl]:
    """One Impl per method spec ("window", or "window@triton" for a chosen backend, labelled "attnlab@triton"
    so two backends of one method sit side by side in a run), then each method's peers once."""
    peer_list = peers_mod.PEERS if peer_list is None else peer_list
    wanted = None if peer_sel in ("all", "") else set() if peer_sel == "none" else set(peer_sel.split(","))
    # Priority under a time budget: the SDPA baseline first, then attnlab's methods, then the peers.
    ordered = sorted(methods, key=lambda m: m != "sdpa")
    out = []
    for spec in ordered:
        name, backend = split_spec(spec)
        out.append(Impl(name, "attnlab" + (f"@{backend}" if backend else ""), backend=backend))
    bases = list(dict.fromkeys(split_spec(m)[0] for m in ordered))
    chosen = [p for m in bases for p in peers_mod.peers_for(m, peer_list) if wanted is None or p.impl in wanted]
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
    raise_recompile_limit()
    deadline = None if time_budget_s is None else started + time_budget_s
    steps = parse_batch(str(batch))
    lengths = sorted(lengths)
    impls = plan_impls(methods, peers, peer_list)
    from ..cli.common import environment

    env = environment(device)
    ceilings = harness.ceilings(device)  # measured once, before the rows (CUDA only; {} when it cannot be)
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
                **env, "note": "", "kernel": None, **harness.result_fields(device),
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
            row.update(harness.own_cost(row.pop("_own_flops", None), b, heads, t, head_dim, mode, dtype.itemsize))
            ok = row.get("status") == "ok" and row.get("ms")
            if ok:
                row["tflops"] = round(row["flops"] / (row["ms"] * 1e-3) / 1e12, 3)
            ceil = ceilings if ok else {}
            row.update(ceil)
            if ceil:
                if row["method_flops"] is not None:
                    row["method_tflops"] = round(row["method_flops"] / (row["ms"] * 1e-3) / 1e12, 3)
                    row["matmul_fraction"] = round(row["method_tflops"] / ceil["ceiling_matmul_tflops"], 4)
                row["copy_fraction"] = round(row["min_bytes"] / (row["ms"] * 1e-3) / 1e9 / ceil["ceiling_copy_gbps"], 4)
            row["flops_convention"] = ("flops: dense-equivalent 4*B*H*T^2*D fwd, /2 causal, x3.5 fwd+bwd (effective "
                                       "for approximate methods); method_flops: the method's own matmul work "
                                       "(AttentionMethod.flops), x3.5 fwd+bwd")
            row["command"] = command
            row["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            rows.append(row)
            bar.update(1)
            if out_path is not None:
                _write_json(out_path, rows)
    bar.close()
    return rows


def _measure(im, t, b, heads, head_dim, dtype, device, causal, mode, repeats, warmup, overrides, row_budget_s, seed):
    extra: dict = {}
    fn = module = None
    try:
        options = method_options(im.method, t, {**overrides.get(im.method, {}),
                                                **({"backend": im.backend} if im.backend else {})})
        extra["options"] = _jsonable(options)
        if im.impl.startswith("attnlab") and overrides.get(im.method):  # a variant: tables keep it apart
            extra["overrides"] = _jsonable(overrides[im.method])
        fn, prepare, params, note, module = im.build(t, heads, head_dim, causal, dtype, device, options)
        extra["note"] = note
        extra["_own_flops"] = _own_flops(im.method, module, options, t, heads, head_dim, causal,
                                         mode == "fwd+bwd")
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
    extra["kernel"] = getattr(module, "kernel", None) if module is not None else im.impl
    del fn, params, module
    if result["status"] != "ok":
        harness.free_memory(device)  # bench_one already did; the module and peer state are gone only now
    elif torch.device(device).type == "cuda":
        torch.cuda.empty_cache()  # no gc.collect on the happy path: it costs ~0.1 s a row
    return {**extra, **result}


def _own_flops(method, module, options, t, heads, head_dim, causal, grad):
    """The method's forward FLOPs per (batch, head) at this length, of the form that runs with gradients when grad
    (peers: counted on attnlab's module with the same options, built on CPU); None when the method does not count
    them."""
    try:
        if module is None:
            import attnlab

            module = attnlab.make(method, head_dim=head_dim, num_heads=heads, **options)
        return module.flops(t, t, causal, grad=grad)
    except Exception:  # noqa: BLE001 - a count we cannot make is a missing field, not a failed row
        return None


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


