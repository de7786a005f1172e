"""The codec report's plot, three panels: held-out token accuracy at the longest length against the compression
(one line per training recipe, error bars spanning the seeds), accuracy by input length for each ratio (one model
per ratio serves them all), and bytes per character against character accuracy beside gzip / bz2 / xz."""
from __future__ import annotations

from collections import defaultdict
from statistics import mean


def recipe(r: dict) -> tuple:
    return (r.get("steps"), r.get("latent_dim"), r.get("bias", "distance"))


def recipe_label(key: tuple) -> str:
    steps, dim, bias = key
    return f"{steps} steps, {dim}-d latents" + ("" if bias == "distance" else f", bias {bias} (the paper's)")


def longest_length(models) -> int:
    """The longest length every model with accuracy by length was evaluated at (models trained to different
    lengths share their shorter ones), else the longest any was; 0 where none has any."""
    sets = [set(map(int, r["by_length"])) for r in models if r.get("by_length")]
    if not sets:
        return 0
    shared = set.intersection(*sets)
    return max(shared) if shared else max(max(s) for s in sets)


def plot(rows: list[dict], path, title: str = "attnlab compress: the autoencoder as a lossy text codec") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    from ..plotting import save

    fig, (a, m, b) = plt.subplots(1, 3, figsize=(18, 4.8), gridspec_kw={"width_ratios": [1, 1, 1.1]})
    models = {r["model"]: r for r in rows if r.get("codec") == "attnlab"}  # one row per model (its by_length)
    longest = longest_length(models.values())
    colours = {}
    for key in sorted({recipe(r) for r in models.values()}, key=lambda k: (k[2] != "distance", -(k[1] or 0), -(k[0] or 0))):
        colours[key] = f"C{len(colours)}"
    groups = defaultdict(lambda: defaultdict(list))
    for r in models.values():
        if str(longest) in (r.get("by_length") or {}):  # a model evaluated at no length, or not at this one: not here
            groups[recipe(r)][r["ratio"]].append(r["by_length"][str(longest)]["token_accuracy"])
    for key in sorted(groups, key=lambda k: (k[2] != "distance", -(k[1] or 0), -(k[0] or 0))):
        ratios = sorted(groups[key])
        accs = [groups[key][x] for x in ratios]
        seeds = max(len(v) for v in accs)
        a.errorbar([1 / x for x in ratios], [mean(v) for v in accs],
                   yerr=[[mean(v) - min(v) for v in accs], [max(v) - mean(v) for v in accs]], marker="o", ms=4,
                   capsize=3, color=colours[key], label=recipe_label(key) + (f" ({seeds} seeds)" if seeds > 1 else ""))
    a.set(xlabel="tokens per latent vector (1 / ratio)", ylabel=f"held-out token accuracy, {longest} tokens",
          xscale="log", title="accuracy vs compression")
    a.set_xticks(sorted({1 / r["ratio"] for r in models.values()}) or [1])
    a.get_xaxis().set_major_formatter(FormatStrFormatter("%.3g"))
    a.grid(alpha=0.3)
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    main = max(groups, key=lambda k: (k[2] == "distance", k[1] or 0, k[0] or 0)) if groups else None
    for r in sorted((r for r in models.values() if recipe(r) == main and r.get("seed") in (0, None)
                     and r.get("by_length")), key=lambda r: -r["ratio"]):
        lengths = sorted(map(int, r["by_length"]))
        m.plot(lengths, [r["by_length"][str(n)]["token_accuracy"] for n in lengths], marker="o", ms=4,
               label=f"ratio 1/{1 / r['ratio']:.3g}")
    m.set(xlabel="input length (tokens)", ylabel="held-out token accuracy", xscale="log",
          title="one model per ratio, every length" + (f"\n({recipe_label(main)})" if main else ""))
    if main:
        m.set_xticks(sorted({int(n) for r in models.values() for n in r.get("by_length") or {}}))
    m.get_xaxis().set_major_formatter(FormatStrFormatter("%d"))
    m.grid(alpha=0.3)
    if m.get_legend_handles_labels()[0]:
        m.legend(fontsize=7)
    for name, r0 in sorted(models.items()):
        if r0.get("seed") not in (0, None):
            continue
        pts = sorted((r["bytes_per_char"], r["char_accuracy"], r["bits"]) for r in rows
                     if r.get("codec") == "attnlab" and r["model"] == name)
        key = recipe(r0)
        b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, lw=1, color=colours[key],
               label=recipe_label(key))
        b.annotate(f"1/{1 / r0['ratio']:.3g}", (pts[0][0], pts[0][1]), textcoords="offset points", xytext=(-4, 3),
                   fontsize=7, ha="right", color=colours[key])
    lossless = sorted((r["bytes_per_char"], r["codec"]) for r in rows if r.get("codec") in ("gzip", "bz2", "xz"))
    if lossless:
        b.scatter([x for x, _ in lossless], [1.0] * len(lossless), marker="s", color="black", zorder=3,
                  label="lossless: " + ", ".join(f"{c} {x:.2f}" for x, c in lossless))
    b.set(xlabel="bytes per character (log)", ylabel="character accuracy", xscale="log",
          title="lossy codec vs lossless compressors\n(a line: one model at 4, 6, 8 bits per number; label: its ratio)")
    b.grid(alpha=0.3, which="both")
    handles, labels = b.get_legend_handles_labels()
    seen = {}
    for h, lab in zip(handles, labels):
        seen.setdefault(lab, h)
    b.legend(seen.values(), seen.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in (a, m, b):
        ax.xaxis.set_minor_formatter(NullFormatter())
    save(fig, path, title)
