"""Which attention each layer should run: the cheapest per-layer spec whose held-out KL stays within a budget.

    rows = scan(model, windows, methods)                          # KL of each (method, layer), one layer swapped
    costs = attention_costs(model, methods, seq_len=8192)         # one attention layer's time / memory per method
    path = greedy_path(rows, costs, num_layers)                   # all original -> every layer switched, best first
    result = advise(model, windows, rows, costs, max_kl=0.05)     # verified on the whole mixed model

The path is a greedy multiple-choice knapsack over the scan: each step moves one layer to a cheaper method (from
its own attention, or from a method already chosen to a cheaper one), the move with the most attention time saved
per unit of scanned KL added first. Per-layer KLs do not simply add (layers interact), so points of the path are
verified by running the whole mixed model on the held-out windows; the recommendation is the cheapest verified
point whose measured KL is within the budget, beside each method swapped into every layer (the single-method
choices a user would otherwise make).
"""
from __future__ import annotations

import torch

from ..adapters.spec import ORIGINAL, Rule, SwapSpec
from ..adapters.swap import swapped
from ..metrics import fidelity as fm
from ..types import AttnlabError


def attention_costs(model, methods: dict[str, dict], *, seq_len: int, mode: str = "fwd", dtype=None,
                    repeats: int = 5) -> dict[str, dict]:
    """One attention layer of `model`'s shape (heads, KV heads, head dim; batch 1, causal) at `seq_len` on the
    model's device: {"original": sdpa's row, method: its row} with the bench harness's `ms` and `extra_mem_bytes`
    (the model's own attention is timed as sdpa, its default fused kernel)."""
    from .. import make
    from ..bench.harness import bench_one

    cfg = model.config
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    p = next(model.parameters())
    device, dtype = p.device, dtype or p.dtype
    g = torch.Generator().manual_seed(0)

    def inputs():
        return tuple(torch.randn(1, h, seq_len, head_dim, generator=g).to(device, dtype) for h in (heads, kv, kv))

    out = {}
    for name, opts in {ORIGINAL: ("sdpa", {}), **{m: (m, o) for m, o in methods.items()}}.items():
        method = make(opts[0], head_dim=head_dim, num_heads=heads, num_kv_heads=kv, **opts[1]).to(device).eval()
        row = bench_one(lambda q, k, v, m=method: m(q, k, v, causal=True).out, inputs, mode, device, repeats=repeats,
                        warmup=2)
        if row["status"] != "ok":
            raise AttnlabError(f"advise: timing {name} at {seq_len} tokens failed: {row['status']}: {row['error']}")
        out[name] = {k: row.get(k) for k in ("ms", "ms_min", "ms_max", "repeats", "extra_mem_bytes", "peak_mem_bytes")}
    return out


def wide_spread(costs: dict[str, dict], factor: float = 1.5) -> list[str]:
    """The timed rows whose slowest call took more than `factor` x their fastest (a busy or throttled machine:
    the medians, and so the recommendation, may not repeat), as "name min-max ms"."""
    return [f"{name} {c['ms_min']:.3g}-{c['ms_max']:.3g} ms" for name, c in costs.items()
            if c.get("ms_min") and c.get("ms_max") and c["ms_max"] > factor * c["ms_min"]]


def costs_from_rows(path, methods, *, seq_len: int, mode: str = "fwd") -> dict[str, dict]:
    """The same dict as `attention_costs`, read from committed `attnlab bench` rows (a JSON list of rows, or an
    object with "rows"): attnlab's causal rows at `seq_len` and `mode`, sdpa standing in for the original. Their
    shape is the benchmark's (heads, head dim, batch), not the model's: the ratios between methods are what carry
    over. Each entry names its file, device and the options the row was timed with."""
    import json
    from pathlib import Path

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise AttnlabError(f"--cost-from {str(path)!r}: not a readable JSON file ({type(e).__name__}: {e})") from None
    rows = data.get("rows", []) if isinstance(data, dict) else data
    ok = [r for r in rows if isinstance(r, dict) and r.get("impl") == "attnlab" and r.get("causal") is True
          and r.get("mode") == mode and r.get("status", "ok") == "ok" and r.get("ms") is not None]
    out = {}
    for name in (ORIGINAL, *methods):
        method = "sdpa" if name == ORIGINAL else name
        hits = [r for r in ok if r.get("method") == method and r.get("seq_len") == seq_len]
        if not hits:
            lengths = sorted({r["seq_len"] for r in ok if r.get("method") == method})
            raise AttnlabError(f"--cost-from {str(path)!r} has no causal {mode} row for {method} at {seq_len} tokens "
                               f"(lengths there: {lengths or 'none'})")
        r = hits[0]
        out[name] = {"ms": r["ms"], "extra_mem_bytes": r.get("extra_mem_bytes"), "peak_mem_bytes": r.get("peak_mem_bytes"),
                     "source": str(path), "device_name": r.get("device_name"), "options": r.get("options"),
                     "shape": {k: r.get(k) for k in ("batch", "heads", "head_dim")}}
    return out


def greedy_path(scan_rows: list[dict], costs: dict[str, dict], num_layers: int) -> list[dict]:
    """From every layer original to every layer on its cheapest method, one move at a time. A move switches one
    layer to a method cheaper than its current one; the next move is the one with the most time saved per unit of
    scanned KL added (moves that add no KL first). Each step: {"assign": {layer: method}, "kl_est": sum of the
    scanned KLs, "ms": attention time summed over layers}."""
    options: dict[int, list[tuple[str, float]]] = {layer: [] for layer in range(num_layers)}  # layer -> (method, KL)
    for r in scan_rows:
        options[r["layer"]].append((r["method"], max(0.0, r["kl"])))
    base_ms = costs[ORIGINAL]["ms"]
    assign = {layer: ORIGINAL for layer in range(num_layers)}
    cur_kl = {layer: 0.0 for layer in range(num_layers)}
    path = [{"assign": dict(assign), "kl_est": 0.0, "ms": base_ms * num_layers}]
    while True:
        best = None
        for layer in range(num_layers):
            now_ms = costs[assign[layer]]["ms"]
            for m, k in options[layer]:
                if costs[m]["ms"] >= now_ms:
                    continue
                saved, added = now_ms - costs[m]["ms"], k - cur_kl[layer]
                ratio = float("inf") if added <= 0 else saved / added
                if best is None or (ratio, saved) > best[0]:
                    best = ((ratio, saved), layer, m, k)
        if best is None:
            return path
        _, layer, m, k = best
        assign[layer], cur_kl[layer] = m, k
        path.append({"assign": dict(assign), "kl_est": sum(cur_kl.values()),
                     "ms": sum(costs[a]["ms"] for a in assign.values())})


def spec_of(assign: dict[int, str], methods: dict[str, dict], seed: int = 0) -> SwapSpec:
    """A SwapSpec with one rule per method naming its layers (the rest original)."""
    rules = []
    for m, opts in methods.items():
        layers = sorted(layer for layer, a in assign.items() if a == m)
        if layers:
            rules.append(Rule(",".join(map(str, layers)), m, dict(opts)))
    return SwapSpec(rules or [Rule("*", ORIGINAL)], seed=seed)


def measure(model, windows: torch.Tensor, base: list[torch.Tensor], spec: SwapSpec) -> dict:
    """Held-out KL mean / p95, top-1 agreement and ppl of the whole model under `spec` against `base` logits."""
    device = next(model.parameters()).device
    stats = []
    with swapped(model, spec), torch.no_grad():
        for i, w in enumerate(windows):
            logits = model(w[None].to(device)).logits.float().cpu()
            stats.append(fm.next_token_stats(base[i], logits, windows[i:i + 1].cpu()))
    return fm.summarise(stats)


def advise(model, windows: torch.Tensor, scan_rows: list[dict], costs: dict[str, dict], methods: dict[str, dict], *,
           max_kl: float, points: int = 6, seed: int = 0, progress: bool = True) -> dict:
    """Verify the greedy path on the whole model and pick the cheapest point within `max_kl`.

    Verified: `points` steps spread along the path, the last step whose scanned KL is within the budget, then
    (if that one measures over budget) earlier steps by bisection; and each method in every layer. Returns
    {"path", "verified", "singles", "recommended"} (recommended None when no switched layer fits the budget)."""
    from tqdm.auto import tqdm

    num_layers = max(r["layer"] for r in scan_rows) + 1
    path = greedy_path(scan_rows, costs, num_layers)
    device = next(model.parameters()).device
    with torch.no_grad():
        base = [model(w[None].to(device)).logits.float().cpu() for w in windows]
    base_ms = path[0]["ms"]
    verified: dict[int, dict] = {}
    bar = tqdm(desc="verify", unit="model", disable=not progress)

    def check(step: int) -> dict:
        if step not in verified:
            bar.set_postfix_str(f"step {step} of {len(path) - 1}")
            verified[step] = {**measure(model, windows, base, spec_of(path[step]["assign"], methods, seed)),
                              "step": step, "ms": path[step]["ms"], "time_ratio": path[step]["ms"] / base_ms,
                              "kl_est": path[step]["kl_est"],
                              "switched": sum(a != ORIGINAL for a in path[step]["assign"].values())}
            bar.update()
        return verified[step]

    last = len(path) - 1
    for i in range(1, points + 1):
        check(round(i * last / points))
    within = [i for i, p in enumerate(path) if p["kl_est"] <= max_kl]
    hi = within[-1] if within else 0
    lo = 0
    if hi > 0 and check(hi)["kl"] > max_kl:  # bisect: the largest step that measures within the budget
        ok = [s for s, v in verified.items() if v["kl"] <= max_kl and s < hi]
        lo = max(ok, default=0)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if check(mid)["kl"] <= max_kl:
                lo = mid
            else:
                hi = mid
    good = [v for v in verified.values() if v["kl"] <= max_kl and v["step"] > 0]
    recommended = min(good, key=lambda v: v["ms"]) if good else None
    singles = []
    for m in methods:
        spec = SwapSpec.of(m, **methods[m]).with_seed(seed)
        bar.set_postfix_str(f"{m} in every layer")
        singles.append({"method": m, **measure(model, windows, base, spec), "ms": costs[m]["ms"] * num_layers,
                        "time_ratio": costs[m]["ms"] / costs[ORIGINAL]["ms"]})
        bar.update()
    bar.close()
    if recommended is not None:
        recommended = {**recommended, "assign": path[recommended["step"]]["assign"],
                       "spec": spec_of(path[recommended["step"]]["assign"], methods, seed).to_dict()}
    return {"path": path, "verified": sorted(verified.values(), key=lambda v: v["step"]), "singles": singles,
            "recommended": recommended}


def plot(result: dict, max_kl: float, path, title: str = "") -> None:
    """Measured KL vs attention time (relative to the original) of the verified path points, the scanned estimate
    along the whole path, and each method in every layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plotting import save

    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    base = result["path"][0]["ms"]
    est = result["path"][1:]
    ax.plot([p["ms"] / base for p in est], [max(p["kl_est"], 1e-5) for p in est], color="tab:blue", alpha=0.35, lw=1,
            label="greedy path: sum of scanned per-layer KLs")
    ver = [v for v in result["verified"] if v["step"] > 0]
    ax.plot([v["time_ratio"] for v in ver], [max(v["kl"], 1e-5) for v in ver], "o-", color="tab:blue",
            label="greedy path, whole model measured")
    for s in result["singles"]:
        ax.plot(s["time_ratio"], max(s["kl"], 1e-5), "s", ms=8, label=f"{s['method']} in every layer")
    rec = result["recommended"]
    if rec is not None:
        ax.plot(rec["time_ratio"], max(rec["kl"], 1e-5), "*", ms=18, color="tab:red",
                label=f"recommended: {rec['switched']} layers switched")
    ax.axvline(1.0, color="black", ls=":", lw=1, label="original (KL 0: below the log axis)")
    ax.axhline(max_kl, color="gray", ls="--", lw=1)
    ax.text(0.99, max_kl, f"budget {max_kl:g} ", color="gray", fontsize=8, va="bottom", ha="right",
            transform=ax.get_yaxis_transform())
    xs = [v["time_ratio"] for v in ver] + [s["time_ratio"] for s in result["singles"]]
    if xs and max(xs) / max(min(xs), 1e-9) > 4:
        ax.set_xscale("log")
    ax.set(yscale="log", xlabel="attention time, all layers, relative to the original model's (lower = cheaper)",
           ylabel="held-out KL(original || mixed), nats/token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save(fig, path, title, title_size=9)
