"""The vision results as a table (text and Markdown) and a plot: test accuracy against training time per epoch
and against peak training memory, one panel pair per patch size."""
from __future__ import annotations

from .train import summary_rows

COLUMNS = [("method", "method", "{}"), ("patch", "patch", "{}"), ("seq_len", "T", "{}"),
           ("test_accuracy", "test acc", "{:.4f}"), ("accuracy_vs_dense", "vs sdpa", "{:+.4f}"),
           ("epoch_s", "s/epoch", "{:.2f}"), ("images_per_s", "img/s (infer)", "{:.0f}"),
           ("peak_mem_bytes", "peak train MiB", "MiB"), ("time_ratio_sdpa", "time / sdpa", "{:.2f}"),
           ("mem_ratio_sdpa", "mem / sdpa", "{:.2f}"), ("time_ratio_dense", "time / dense", "{:.2f}")]


def _cell(row, key, fmt) -> str:
    val = row.get(key)
    if val is None:
        return "-"
    if fmt == "MiB":
        return f"{val / 2 ** 20:.0f}"
    return fmt.format(val)


def table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    head = [h for _, h, _ in COLUMNS]
    body = []
    for r in summary_rows(rows):
        if "error" in r:
            body.append([r["method"], str(r.get("patch")), str(r.get("seq_len"))] + [f"not run: {r['error']}"]
                        + [""] * (len(COLUMNS) - 4))
        else:
            body.append([_cell(r, k, f) for k, _, f in COLUMNS])
    return head, body


def format_table(rows: list[dict]) -> str:
    head, body = table_rows(rows)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    for b in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip())
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    head, body = table_rows(rows)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(out)


def plot(rows: list[dict], path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    from ..plotting import place_labels, save

    patches = sorted({r["patch"] for r in rows}, reverse=True)
    with_mem = any(r.get("peak_mem_bytes") for r in rows)
    ncols = 2 if with_mem else 1
    fig, axes = plt.subplots(len(patches), ncols, figsize=(6.5 * ncols, 4.6 * len(patches)), squeeze=False)
    for i, patch in enumerate(patches):
        ok = [r for r in rows if r["patch"] == patch and "error" not in r]
        bad = [r for r in rows if r["patch"] == patch and "error" in r]
        seq = next((r["seq_len"] for r in rows if r["patch"] == patch), "?")
        run = next((f", {r['train_images']} training images, {r['epochs']} epochs" for r in ok), "")
        ref = next((r["test_accuracy"] for r in ok if r["method"] == "sdpa"), None)
        panels = [("epoch_s", "training time per epoch (s)", 1.0)]
        if with_mem:
            panels.append(("peak_mem_bytes", "peak training memory (GiB)", 2.0 ** -30))
        for ax, (key, label, unit) in zip(axes[i], panels):
            pts = sorted(((r[key] * unit, r["test_accuracy"], r["method"]) for r in ok if r.get(key)), key=lambda p: p[0])
            ax.scatter([p[0] for p in pts], [p[1] for p in pts],
                       color=["tab:gray" if p[2] in ("sdpa", "dense") else "tab:blue" for p in pts])
            place_labels(fig, ax, pts)
            if ref is not None:
                for delta, style in ((0.0, "-"), (-0.01 if patch >= 4 else -0.02, "--")):
                    ax.axhline(ref + delta, color="gray", ls=style, lw=0.8)
                ax.text(0.01, ref - (0.01 if patch >= 4 else 0.02), f" sdpa - {1 if patch >= 4 else 2} pt",
                        color="gray", fontsize=7, ha="left", va="bottom", transform=ax.get_yaxis_transform())
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(ScalarFormatter())
            ax.tick_params(axis="x", which="minor", labelsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.set_title(f"patch {patch} ({seq} tokens{run})", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            if bad:
                ax.text(0.01, 0.01, "not run: " + "; ".join(f"{r['method']} ({r['error'][:40]})" for r in bad),
                        transform=ax.transAxes, fontsize=7)
    save(fig, path, title)


def load_rows(paths) -> list[dict]:
    """Rows from result files: a vision-*.json (its "rows") or a .jsonl (one row a line, written as methods finish)."""
    import json
    from pathlib import Path

    rows = []
    for p in map(Path, paths):
        if p.suffix == ".jsonl":
            rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        else:
            rows += json.loads(p.read_text())["rows"]
    return rows


def main(argv=None) -> int:
    """python -m attnlab.vision.report FILE... [--out PNG] [--title T] [--markdown]: merge runs, table and plot."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m attnlab.vision.report", description=main.__doc__)
    p.add_argument("files", nargs="+", help="vision-*.json or .jsonl result files")
    p.add_argument("--out", default=None, help="write the plot of all rows here (PNG)")
    p.add_argument("--title", default="", help="plot title")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    rows = load_rows(args.files)
    print(markdown_table(rows) if args.markdown else format_table(rows))
    if args.out:
        plot(rows, args.out, title=args.title)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
