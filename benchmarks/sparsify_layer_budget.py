"""Per-layer budgets for a global-sparse pattern from measured sensitivity (an experiment on `attnlab sparsify`'s
pattern): prune one layer at a time at --probe (everything else original) and record the held-out KL; then give
layer l a kept fraction proportional to sensitivity_l ** alpha (clamped to [0.03, 0.6]), scaled until the mean
causal token density equals the uniform --sparsity's, and evaluate KL and perplexity beside the uniform budget on
the same held-out windows.

    attnlab sparsify --seq-len 2048 --windows 8 --eval-windows 2 --sparsity 0.9 --block-size 32 --out runs/sp32
    python benchmarks/sparsify_layer_budget.py --pattern runs/sp32/pattern --seq-len 2048 --out runs/layer_budget

Writes OUT/layer_budget.json (sensitivity per layer, and one row per budget) and reuses OUT/sensitivity.json when
it exists (the probe costs one held-out evaluation per layer: ~8 minutes for 30 layers at 2048 tokens on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import attnlab
from attnlab import models
from attnlab.adapters.spec import Rule, SwapSpec
from attnlab.cli import common
from attnlab.metrics import fidelity as fm
from attnlab.reduction.global_sparse import blocks_density, load_pattern, selected_blocks
from attnlab.train.data import eval_windows


def mean_density(pat, ps: list[float], t: int) -> float:
    """Mean causal token density over the layers, layer l at sparsity ps[l] (its heads sharing the budget)."""
    return sum(blocks_density(pat, selected_blocks(pat, p)[i], t) for i, p in enumerate(ps)) / len(ps)


def allocation(sens: list[float], alpha: float, keep_mean: float) -> list[float]:
    """Kept fractions (1 - sparsity) per layer, mean keep_mean, proportional to sens ** alpha within [0.03, 0.6]."""
    w = torch.tensor(sens).clamp_min(1e-6) ** alpha
    keep = (w / w.sum() * keep_mean * len(sens)).clamp(0.03, 0.6)
    for _ in range(100):  # renormalise under the clamps
        keep = (keep * keep_mean * len(sens) / keep.sum()).clamp(0.03, 0.6)
    return [round(float(k), 5) for k in keep]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pattern", required=True)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--eval-windows", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--probe", type=float, default=0.97, help="sparsity of the one pruned layer when probing")
    ap.add_argument("--alpha", default="1.0", help="comma list of exponents")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pat = load_pattern(a.pattern)
    if a.seq_len > pat.max_len:
        sys.exit(f"--seq-len {a.seq_len} exceeds what the pattern covers ({pat.max_len})")
    model, tok = models.load(a.model, dtype=torch.float32, device="cpu")
    held = eval_windows(tok, None, a.seq_len, a.eval_windows)
    n_layers = model.config.num_hidden_layers

    def logits(spec=None):
        res = []
        with (attnlab.swapped(model, spec) if spec else contextlib.nullcontext()), torch.no_grad():
            for w in held:
                res.append(model(w[None]).logits.float())
        return res

    base = logits()

    def score(spec):
        lg = logits(spec)
        return fm.summarise([fm.next_token_stats(base[i], lg[i], held[i:i + 1]) for i in range(len(held))])

    def spec_for(ps):
        return SwapSpec(rules=[Rule(str(i), "global_sparse", {"pattern": a.pattern, "sparsity": p})
                               for i, p in enumerate(ps)])

    sens_file = out / "sensitivity.json"
    probe_key = {"model": a.model, "pattern": str(Path(a.pattern).resolve()), "seq_len": a.seq_len,
                 "eval_windows": a.eval_windows, "probe": a.probe}
    saved = json.loads(sens_file.read_text()) if sens_file.exists() else {}
    if saved.get("key") == probe_key:  # the same probe: reuse
        sens = saved["kl"]
    else:
        sens = []
        for layer in tqdm(range(n_layers), desc="probe"):
            sens.append(score(SwapSpec(rules=[Rule(str(layer), "global_sparse",
                                                    {"pattern": a.pattern, "sparsity": a.probe})]))["kl"])
        sens_file.write_text(json.dumps({"key": probe_key, "kl": sens}))
    uniform = [a.sparsity] * n_layers
    target = mean_density(pat, uniform, a.seq_len)
    budgets = [("uniform", None, uniform, target)]
    for alpha in (float(x) for x in a.alpha.split(",")):
        keep_mean = 1 - a.sparsity
        for _ in range(8):  # rescale the kept fraction until the mean density meets the uniform budget's
            ps = [1 - k for k in allocation(sens, alpha, keep_mean)]
            dens = mean_density(pat, ps, a.seq_len)
            if abs(dens / target - 1) < 2e-3:
                break
            keep_mean *= target / dens
        budgets.append((f"sensitivity^{alpha}", alpha, ps, dens))
    rows = []
    for name, alpha, ps, dens in budgets:
        t0 = time.time()
        s = score(spec_for(ps))
        rows.append({"budget": name, "alpha": alpha, "sparsity_per_layer": ps, "density": dens, **s,
                     "seconds": round(time.time() - t0, 1)})
        print(f"{name:>16} density {dens:.4f}  KL {s['kl']:.4f}  ppl {s['ppl']:.3f} (original {s['ppl_original']:.3f})"
              f"  top-1 {s['top1']:.3f}", flush=True)
    (out / "layer_budget.json").write_text(json.dumps({
        "command": "python " + " ".join(sys.argv), "commit": common.git_commit(), "pattern": a.pattern,
        "seq_len": a.seq_len, "eval_windows": a.eval_windows, "probe": a.probe, "sensitivity_kl": sens,
        "rows": rows}, indent=1))
    plot(out / "layer_budget.json")
    return 0


def plot(path) -> None:
    """OUT/layer_budget.png: each layer's probed KL, and the fraction of blocks each budget keeps per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(path).read_text())
    layers = range(len(res["sensitivity_kl"]))
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    ax1.bar(layers, res["sensitivity_kl"], color="tab:gray")
    ax1.set(ylabel=f"KL, this layer alone at {res['probe']:.0%} pruned",
            title=f"Per-layer budgets at equal density ({res['seq_len']} tokens, {res['eval_windows']} held-out windows)")
    for r in res["rows"]:
        ax2.plot(layers, [1 - p for p in r["sparsity_per_layer"]], marker="o", ms=3,
                 label=f"{r['budget']}: KL {r['kl']:.3f}, ppl {r['ppl']:.2f} (original {r['ppl_original']:.2f})")
    ax2.set(xlabel="layer", ylabel="fraction of blocks kept")
    ax2.legend(fontsize=8)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(Path(path).with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
