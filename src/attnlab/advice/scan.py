"""Per-layer sensitivity: swap one method into one layer at a time (every other layer original) and measure the
held-out KL(original || swapped) each (method, layer) causes. DuoAttention and MoA found that layers and heads
differ widely in how far they look; this measures it for a given model, text and length.

    rows = scan(model, windows, {"window": {"window": 64, "sinks": 4}, "linear": {}})

The original model's logits are computed once and reused for every run. A layer's method gets the same seed
it would get in a whole-model swap with the same spec seed (adapters/spec.py), so a scan row predicts that
layer's part of the full swap.
"""
from __future__ import annotations

import torch

from ..adapters.spec import SwapSpec
from ..adapters.swap import attention_sites, swapped
from ..metrics import fidelity as fm
from ..timing import Timer


def scan(model, windows: torch.Tensor, methods: dict[str, dict], *, layers: list[int] | None = None, seed: int = 0,
         progress: bool = True) -> list[dict]:
    """One row per (method, layer): KL mean and p95, top-1 agreement and perplexity on `windows` (LongTensor
    [N, T]) with only that layer swapped. `methods`: name -> options (the method's defaults are not added here)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    windows = windows.to(device)
    n_layers = len(attention_sites(model))
    layers = list(range(n_layers)) if layers is None else layers
    with torch.no_grad():
        base = [model(w[None]).logits.float().cpu() for w in windows]
    ids = windows.cpu()
    rows = []
    bar = tqdm(total=len(methods) * len(layers), desc="scan", unit="run", disable=not progress)
    for name, opts in methods.items():
        for layer in layers:
            bar.set_postfix_str(f"{name} @ layer {layer}")
            spec = SwapSpec.of({str(layer): (name, dict(opts))}).with_seed(seed)
            stats, ms = [], []
            with swapped(model, spec), torch.no_grad():
                for i, w in enumerate(windows):
                    with Timer(device) as t:
                        logits = model(w[None]).logits.float().cpu()
                    ms.append(t.ms)
                    stats.append(fm.next_token_stats(base[i], logits, ids[i:i + 1]))
            rows.append({"method": name, "options": dict(opts), "layer": layer, **fm.summarise(stats),
                         "ms_per_window": sorted(ms)[len(ms) // 2]})
            bar.update()
    bar.close()
    return rows


def heatmap(rows: list[dict], path, title: str = "") -> None:
    """Layer x method heat map of log10 KL, each cell labelled; the most sensitive layers stand out."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    layers = sorted({r["layer"] for r in rows})
    grid = torch.full((len(methods), len(layers)), float("nan"))
    for r in rows:
        grid[methods.index(r["method"]), layers.index(r["layer"])] = math.log10(max(r["kl"], 1e-8))
    import textwrap

    width = max(6.0, 0.42 * len(layers) + 2.5)
    title = "\n".join(textwrap.wrap(title, width=int(width * 13))) if title else title  # ~13 chars an inch at 9 pt
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.6 * len(methods) + 0.15 * title.count("\n")))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(layers)), [str(x) for x in layers], fontsize=7)
    ax.set_yticks(range(len(methods)), methods, fontsize=8)
    ax.set_xlabel("layer swapped (all others original)")
    dark = grid[~grid.isnan()].median().item()  # cells above the median are drawn dark: white text there
    for i in range(len(methods)):
        for j in range(len(layers)):
            v = grid[i, j].item()
            if not math.isnan(v):
                ax.text(j, i, f"{10 ** v:.2g}" if 10 ** v >= 1e-3 else "<1e-3", ha="center", va="center", fontsize=5.5,
                        color="white" if v > dark else "black")
    fig.colorbar(im, ax=ax, label="log10 KL (nats/token)", fraction=0.025, pad=0.01)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the colorbar's label too
    plt.close(fig)
