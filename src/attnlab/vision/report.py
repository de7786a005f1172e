"""The vision results as a table (text and Markdown) and a plot: test accuracy against training time per epoch
and against peak training memory (CUDA), one panel pair per run and patch size. Ratios and the plot's reference
line compare rows of the same run only (`train.run_key`)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..types import AttnlabError
from .train import REFERENCES, run_key, summary_rows

COLUMNS = [("method", "method", "{}"), ("patch", "patch", "{}"), ("seq_len", "T", "{}"),
           ("test_accuracy", "test acc", "{:.4f}"), ("accuracy_vs_sdpa", "vs sdpa", "{:+.4f}"),
           ("epoch_s", "s/epoch", "{:.2f}"), ("images_per_s", "img/s (infer)", "{:.0f}"),
           ("peak_mem_bytes", "peak train MiB (CUDA)", "MiB"), ("time_ratio_sdpa", "time / sdpa", "{:.2f}"),
           ("mem_ratio_sdpa", "mem / sdpa", "{:.2f}"), ("time_ratio_dense", "time / dense", "{:.2f}")]
NOTE = ("vs sdpa, time / sdpa, mem / sdpa, time / dense: against the sdpa (dense) row of the same run at the same "
        "patch size, '-' where that run has none; peak memory is measured on CUDA only ('-' on CPU).")


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
            body.append([str(r.get("method")), str(r.get("patch")), str(r.get("seq_len"))] + [f"not run: {r['error']}"]
                        + [""] * (len(COLUMNS) - 4))
        else:
            body.append([_cell(r, k, f) for k, _, f in COLUMNS])
    return head, body


def format_table(rows: list[dict]) -> str:
    head, body = table_rows(rows)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip()]
    for b in body:
        lines.append("  ".join(c.ljust(w) for c, w in zip(b, widths)).rstrip())
    return "\n".join(lines + [NOTE])


def markdown_table(rows: list[dict]) -> str:
    head, body = table_rows(rows)
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(out + ["", NOTE])


def _without_epochs(key: tuple) -> tuple:
    """A run_key less its `epochs` (a failed row trained none): where a failed row's panel is."""
    return key[:3] + key[4:]


def plot(rows: list[dict], path, title: str = "") -> None:
    """Test accuracy against training time per epoch (and, where measured, peak training memory): one row of
    panels per run and patch size (`run_key`), each with its own sdpa as the reference line, the same rows the
    table's ratios use. Panels with nothing to draw (every method of that run failed) are left out and their
    failures named in the title; a plot of nothing at all says so."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.text import Annotation
    from matplotlib.ticker import LogFormatter

    class _PlainLog(LogFormatter):
        def _num_to_string(self, x, vmin, vmax):
            return f"{x:g}"

    from ..plotting import place_labels, save
    from .train import references

    refs = references(rows)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "error" not in r and r.get("test_accuracy") is not None and (r.get("epoch_s") or 0) > 0:
            groups.setdefault(run_key(r), []).append(r)
    failed: dict[tuple, list[dict]] = {k: [] for k in groups}
    unplaced = []
    for r in rows:
        if "error" in r or r.get("test_accuracy") is None or not (r.get("epoch_s") or 0) > 0:
            home = next((k for k in groups if _without_epochs(k) == _without_epochs(run_key(r))), None)
            (failed[home] if home is not None else unplaced).append(r)
    first_seen: dict[tuple, int] = {}
    for i, r in enumerate(rows):
        first_seen.setdefault(run_key(r)[2:], i)
    keys = sorted(groups, key=lambda k: (first_seen.get(k[2:], 0), -(k[0] or 0)))  # per run: largest patch first
    runs = {k[2:] for k in keys}

    def why(rs):
        return "; ".join(f"{r.get('method')} patch {r.get('patch')} ({str(r.get('error', 'no result'))[:40]})"
                         for r in rs)

    full_title = title
    if unplaced and keys:
        full_title = (title + "\n" if title else "") + textwrap.shorten("not run: " + why(unplaced), 160)
    if not keys:
        fig, ax = plt.subplots(figsize=(6.5, 2.4))
        ax.axis("off")
        ax.text(0.01, 0.5, "\n".join(textwrap.wrap("nothing to plot, no method ran: " + why(unplaced), 90)),
                transform=ax.transAxes, fontsize=8, va="center")
        if full_title:
            fig.suptitle(full_title, fontsize=10)
        save(fig, path, full_title)
        return
    with_mem = any(r.get("peak_mem_bytes") for k in keys for r in groups[k])
    ncols = 2 if with_mem else 1
    fig, axes = plt.subplots(len(keys), ncols, figsize=(6.5 * ncols, 4.6 * len(keys)), squeeze=False)
    labelled = []
    for i, key in enumerate(keys):
        ok, bad = groups[key], failed[key]
        patch, seq, r0 = key[0], key[1], ok[0]
        run = f", {r0.get('train_images')} training images, {r0.get('epochs')} epochs"
        if len(runs) > 1:  # several runs merged: name each panel's
            name = str(r0.get("run"))
            run += f", run {Path(name).name if '/' in name else name}, {r0.get('device')} {r0.get('dtype')}, " \
                   f"seed {r0.get('seed')}"
        sdpa = refs.get(key, {}).get("sdpa")
        ref = None if sdpa is None else sdpa.get("test_accuracy")
        panels = [("epoch_s", "training time per epoch (s)", 1.0)]
        if with_mem:
            panels.append(("peak_mem_bytes", "peak training memory (GiB, CUDA)", 2.0 ** -30))
        for ax, (field, label, unit) in zip(axes[i], panels):
            ax.set_title(textwrap.fill(f"patch {patch} ({seq} tokens{run})", 80), fontsize=9)
            pts = sorted(((r[field] * unit, r["test_accuracy"], r["method"]) for r in ok if (r.get(field) or 0) > 0),
                         key=lambda p: p[0])
            if not pts:  # e.g. memory of a CPU run beside CUDA runs
                ax.axis("off")
                ax.text(0.5, 0.5, f"no {label}: not measured", transform=ax.transAxes, ha="center", fontsize=8)
                continue
            ax.scatter([p[0] for p in pts], [p[1] for p in pts],
                       color=["tab:gray" if p[2] in REFERENCES else "tab:blue" for p in pts])
            if ref is not None:
                for delta, style in ((0.0, "-"), (-0.01 if patch >= 4 else -0.02, "--")):
                    ax.axhline(ref + delta, color="gray", ls=style, lw=0.8)
                ax.text(0.01, ref - (0.01 if patch >= 4 else 0.02), f" sdpa - {1 if patch >= 4 else 2} pt",
                        color="gray", fontsize=7, ha="left", va="bottom", transform=ax.get_yaxis_transform())
            ax.set_xscale("log")
            ax.margins(x=0.12)  # room for the labels of the first and last points
            # plain numbers; minor ticks labelled only where they fit (all below 0.6 decades, some below 2)
            ax.xaxis.set_major_formatter(_PlainLog(labelOnlyBase=False))
            ax.xaxis.set_minor_formatter(_PlainLog(labelOnlyBase=False, minor_thresholds=(2, 0.6)))
            ax.tick_params(axis="x", which="minor", labelsize=7)
            ax.set_xlabel(label)
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3, which="both")
            if bad:
                ax.text(0.01, 0.01, "\n".join(textwrap.wrap("not run: " + why(bad), 90)), transform=ax.transAxes,
                        fontsize=7)
            labelled.append((ax, pts))
    # labels last, once the scales, limits and layout are final: place_labels measures distances in display
    # coordinates, and a log scale or a layout set after it moved labels onto each other ("windowdow")
    if full_title:
        fig.suptitle(full_title, fontsize=10)
    fig.tight_layout()
    for ax, pts in labelled:
        ax.set_xlim(ax.get_xlim())
        ax.set_ylim(ax.get_ylim())
        place_labels(fig, ax, pts)
        for t in ax.texts:
            if isinstance(t, Annotation):
                t.set_in_layout(False)  # the layout `save` makes again stays the one the labels were placed in
    save(fig, path, full_title)


def load_rows(paths) -> list[dict]:
    """Rows from result files: a vision-*.json (its "rows") or a .jsonl (one row a line, written as methods finish).
    A row without a `run` (files written before rows had one) gets its file's path: one file, one run. A missing,
    empty or foreign file is an AttnlabError naming it."""
    import json

    rows = []
    for p in map(Path, paths):
        if not p.exists():
            raise AttnlabError(f"{p}: no such file")
        if p.is_dir():
            raise AttnlabError(f"{p} is a folder; give its vision-*.json or .jsonl files")
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise AttnlabError(f"{p}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        if not text.strip():
            raise AttnlabError(f"{p} is empty: no result rows")
        try:
            if p.suffix == ".jsonl":
                found = []
                for i, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        try:
                            found.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise AttnlabError(f"{p} line {i} is not JSON ({e.msg})") from None
            else:
                data = json.loads(text)
                if not isinstance(data, dict) or "rows" not in data:
                    raise AttnlabError(f"{p} has no 'rows': not an attnlab vision result (vision-*.json or .jsonl)")
                found = data["rows"]
        except json.JSONDecodeError as e:
            raise AttnlabError(f"{p} is not JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(found, list) or not found:
            raise AttnlabError(f"{p} holds no result rows")
        for i, r in enumerate(found, 1):
            if not isinstance(r, dict) or "method" not in r or "patch" not in r:
                raise AttnlabError(f"{p}: row {i} is not an attnlab vision row (it needs 'method' and 'patch')")
            if "error" not in r and not isinstance(r.get("test_accuracy"), (int, float)):
                raise AttnlabError(f"{p}: row {i} ({r['method']}) has neither 'test_accuracy' nor 'error'")
            r.setdefault("run", str(p))
        rows += found
    return rows


def check_png(path) -> Path:
    """--out of the plot: a file path whose folder exists or can be made, in a format matplotlib writes."""
    from matplotlib.figure import Figure

    from ..cli.common import check_out_folder

    path = Path(path)
    if path.is_dir():
        raise AttnlabError(f"--out {path} is a folder; give the plot's file name (e.g. {path / 'vision.png'})")
    formats = Figure().canvas.get_supported_filetypes()
    if not path.suffix:  # matplotlib would write PATH.png and the report say PATH
        raise AttnlabError(f"--out {path}: give the plot's file name with its extension (e.g. {path}.png)")
    if path.suffix and path.suffix[1:].lower() not in formats:
        raise AttnlabError(f"--out {path}: matplotlib writes no {path.suffix!r} files ({', '.join(sorted(formats))})")
    check_out_folder(path.parent, "--out's folder")
    return path


def main(argv=None) -> int:
    """python -m attnlab.vision.report FILE... [--out PNG] [--title T] [--markdown]: merge runs, table and plot."""
    from ..cli import OneLineParser

    p = OneLineParser(prog="python -m attnlab.vision.report", description=main.__doc__)
    p.add_argument("files", nargs="+", help="vision-*.json or .jsonl result files")
    p.add_argument("--out", default=None, help="write the plot of all rows here (PNG)")
    p.add_argument("--title", default="", help="plot title")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = p.parse_args(argv)
    try:
        out = check_png(args.out) if args.out else None  # before any file is read
        rows = load_rows(args.files)
        print(markdown_table(rows) if args.markdown else format_table(rows))
        if out is not None:
            try:
                out.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise AttnlabError(f"--out {out}: cannot make its folder ({e.strerror})") from None
            try:
                plot(rows, out, title=args.title)
            except OSError as e:
                raise AttnlabError(f"--out {out}: cannot write it ({e.strerror or e})") from None
            print(f"wrote {out}")
    except AttnlabError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
