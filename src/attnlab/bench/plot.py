"""Plots and the SDPA crossover, from result rows (a JSON list of dicts, as `attnlab bench` writes).

    python -m attnlab.bench.plot results/*.json --out sweep.png     # one PNG, crossover table printed
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

BASELINE = ("sdpa", "attnlab")


def _config_key(r: dict) -> tuple:
    return (r["mode"], bool(r["causal"]), r["dtype"], r["device"], r["heads"], r["head_dim"])


def _label(r: dict) -> str:
    return r["method"] if r["impl"] == "attnlab" else f"{r['method']} [{r['impl']}]"


def crossover(rows: list[dict], baseline: tuple[str, str] = BASELINE) -> list[dict]:
    """Where each (method, impl) becomes cheaper than SDPA, per configuration (mode, causal, dtype, ...).

    Compared length by length at the same batch. A length counts as "cheaper" when the method ran (ok)
    and either the baseline did not (oom / skipped) or the method's value is lower; as "not cheaper" when the
    method ran out of memory or failed where the baseline ran. The crossover is the
    smallest measured length from which the method stays cheaper at every longer length it was compared
    at (None: never; the smallest length: cheaper everywhere). Done for time (`ms`) and memory
    (`peak_mem_bytes`, where measured).
    """
    base = {}
    for r in rows:
        if (r["method"], r["impl"]) == baseline:
            base[_config_key(r) + (r["seq_len"], r["batch"])] = r
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if (r["method"], r["impl"]) != baseline:
            groups[_config_key(r) + (r["method"], r["impl"])].append(r)
    out = []
    for key, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seq_len"])
        entry = {
            "method": rs[0]["method"], "impl": rs[0]["impl"], "mode": rs[0]["mode"], "causal": rs[0]["causal"],
            "dtype": rs[0]["dtype"], "device": rs[0]["device"],
            "baseline": f"{baseline[0]} [{baseline[1]}]",
        }
        for metric, field in (("time", "ms"), ("memory", "peak_mem_bytes")):
            verdicts = []  # (seq_len, cheaper?, speedup or None)
            for r in rs:
                b = base.get(_config_key(r) + (r["seq_len"], r["batch"]))
                if b is None:
                    continue  # nothing to compare at this length
                if r["status"] in ("oom", "error") and b["status"] == "ok":
                    verdicts.append((r["seq_len"], False, None))  # the method failed where SDPA ran: not cheaper
                    continue
                if r["status"] != "ok" or r.get(field) is None:
                    continue  # not measured (skipped, unsupported, no memory on CPU)
                if b["status"] != "ok" or b.get(field) is None:
                    if b["status"] in ("oom", "skipped"):
                        verdicts.append((r["seq_len"], True, None))
                    continue
                verdicts.append((r["seq_len"], r[field] < b[field], b[field] / r[field] if r[field] else None))
            cross = None
            for i, (t, _cheaper, _) in enumerate(verdicts):
                if all(c for _, c, _ in verdicts[i:]):
                    cross = t
                    break
            entry[f"crossover_{metric}"] = cross
            entry[f"ratio_{metric}"] = {str(t): (round(s, 3) if s else None) for t, _, s in verdicts}
        out.append(entry)
    return sorted(out, key=lambda e: (e["mode"], e["causal"], e["method"], e["impl"]))


def crossover_table(entries: list[dict]) -> str:
    """One line per (configuration, method, impl): the crossover length against the baseline, in time and memory.
    "never": compared, and not cheaper up to the longest length; "-": never compared (the impl or the baseline did
    not run, or memory is not measured on this device)."""
    def cell(e, metric):
        return "-" if not e[f"ratio_{metric}"] else ("never" if e[f"crossover_{metric}"] is None
                                                     else str(e[f"crossover_{metric}"]))
    base = entries[0]["baseline"] if entries else "the baseline"
    lines = [f"crossover against {base}: the shortest length from which an impl is faster (time) or smaller "
             "(memory) at every longer length measured; never: not up to the longest; -: not compared",
             f"{'mode':8} {'causal':6} {'method':13} {'impl':22} {'time x-over':>12} {'mem x-over':>11}"]
    for e in entries:
        lines.append(
            f"{e['mode']:8} {str(e['causal']):6} {e['method']:13} {e['impl']:22} "
            f"{cell(e, 'time'):>12} {cell(e, 'memory'):>11}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path, title: str | None = None) -> Path:
    """Time and peak memory vs length, log-log, one line per (method, impl); one column per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = sorted({_config_key(r) for r in rows}, key=str)
    if not configs:
        raise ValueError("no rows to plot")
    labels = sorted({_label(r) for r in rows})
    cmap = plt.get_cmap("tab20")
    color = {lab: cmap(i % 20) for i, lab in enumerate(labels)}
    fig, axes = plt.subplots(2, len(configs), figsize=(6.5 * len(configs), 9), squeeze=False)
    for col, cfg in enumerate(configs):
        mode, causal, dtype, device, heads, head_dim = cfg
        sub = [r for r in rows if _config_key(r) == cfg]
        for lab in labels:
            rs = sorted((r for r in sub if _label(r) == lab), key=lambda r: r["seq_len"])
            style = "-" if rs and rs[0]["impl"] == "attnlab" else "--"
            for ax, field in ((axes[0][col], "ms"), (axes[1][col], "peak_mem_bytes")):
                pts = [(r["seq_len"], r[field] / (2**30 if field == "peak_mem_bytes" else 1))
                       for r in rs if r["status"] == "ok" and r.get(field)]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, marker="o", ms=3, color=color[lab], label=lab)
                ooms = [r["seq_len"] for r in rs if r["status"] == "oom"]
                if ooms and pts:
                    ax.plot(ooms, [pts[-1][1]] * len(ooms), "x", color=color[lab], ms=8)
        batches = sorted({(r["seq_len"], r["batch"]) for r in sub})
        bnote = ", ".join(f"B={b}@T>={t}" for t, b in _batch_steps(batches))
        for ax, ylab in ((axes[0][col], "median time per call (ms)"), (axes[1][col], "peak memory (GiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length")
            ax.set_ylabel(ylab)
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].set_title(f"{mode}, {'causal' if causal else 'non-causal'}, {dtype}, {device}\n"
                               f"H={heads}, D={head_dim}, {bnote}", fontsize=9)
        if device != "cuda" and not any(r.get("peak_mem_bytes") for r in sub):
            axes[1][col].text(0.5, 0.5, "memory not measured on CPU", ha="center", transform=axes[1][col].transAxes)
    handles, labs = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labs:
                handles.append(h)
                labs.append(lab)
    width = fig.get_figwidth()
    fig.legend(handles, labs, loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title or "attnlab bench (x = out of memory; dashed = peer package)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - 2.6 / width, 0.96))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _batch_steps(pairs):
    steps, last = [], None
    for t, b in pairs:
        if b != last:
            steps.append((t, b))
            last = b
    return steps


def load_rows(paths) -> list[dict]:
    rows = []
    for p in paths:
        if str(p).endswith(".crossover.json"):
            continue
        data = json.loads(Path(p).read_text())
        rows.extend(r for r in data if isinstance(r, dict) and "seq_len" in r and "status" in r)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnlab.bench.plot", description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="result files written by attnlab bench")
    ap.add_argument("--out", required=True, help="PNG path; the crossover table goes beside it as .crossover.json")
    args = ap.parse_args(argv)
    rows = load_rows(args.json)
    plot(rows, args.out)
    entries = crossover(rows)
    Path(args.out).with_suffix(".crossover.json").write_text(json.dumps(entries, indent=1))
    print(crossover_table(entries))
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
