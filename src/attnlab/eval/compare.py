"""`attnlab compare`: swap each method into a real model and measure how far it moves, without fine-tuning.

Two tasks:
- "lm" (causal LM, default SmolLM2-135M on held-out Moby Dick windows): next-token KL vs the original,
  top-1 agreement, perplexity of both, attention-probability MSE, gradient cosine, time and memory.
- "spam" (encoder, default all-MiniLM-L6-v2 on Spam Assassin): a logistic-regression head trained on frozen
  dense mean-pooled embeddings; test accuracy of the original and of each method swapped in.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import registry
from ..adapters.spec import SwapSpec, changes_nothing
from ..adapters.state import Saved, check_fingerprint, check_saved, read_meta
from ..adapters.swap import swapped
from ..metrics import fidelity as fm
from ..timing import Timer
from ..types import AttnlabError, UnsupportedError


@dataclass
class Variant:
    """One row of a comparison: a method with options, a per-layer spec, or a saved (trained) attention."""

    label: str
    method: str  # the method name; "spec" for a per-layer spec file; "saved" for a saved attention directory
    options: dict = field(default_factory=dict)
    target: object = None  # what attnlab.swapped takes

    @classmethod
    def of_method(cls, method: str, options: dict) -> "Variant":
        return cls(method, method, dict(options), SwapSpec.of(method, **options))

    def has_probs(self) -> bool:
        if self.method in ("spec", "saved"):
            spec = self.target if isinstance(self.target, SwapSpec) else self.target.spec()
            return all(registry.capabilities(m).probs for m in spec.methods())
        return registry.capabilities(self.method).probs


def resolve(methods: list[str] | None, overrides: dict[str, dict], seq_len: int, *, specs: list[str] = (),
            loads: list[str] = ()) -> list[Variant]:
    """Variants to compare: method names (default: every registered method when no spec or saved directory is
    given) with the method's own defaults at `seq_len`, `--set` overrides on top; per-layer spec files; saved
    attention directories. Unknown methods, option names or values, and unreadable files fail here, before
    any model work."""
    if methods is None and not specs and not loads:
        # references first, then the approximations alphabetically
        methods = sorted(registry.standalone_methods(), key=lambda n: (n not in ("dense", "sdpa"), n))
    methods = list(methods or [])
    for n in methods:
        registry.get(n)  # unknown names fail here, listing the valid ones
    for m in overrides:
        if m not in methods:
            raise AttnlabError(f"--set {m}.*: method {m!r} is not among the compared methods {methods}")
    out = []
    for n in methods:
        opts = registry.options_at(n, seq_len, overrides.get(n))
        registry.check_options(n, opts)  # bad option names/values fail before any model work
        out.append(Variant.of_method(n, opts))
    for path in specs:
        spec = SwapSpec.from_json(Path(path)) if Path(path).is_file() else None
        if spec is None:
            raise AttnlabError(f"--spec {path!r}: no such file")
        spec = spec.at_length(seq_len)  # a rule's omitted options are the method's at this length, as for --methods
        spec.validate()
        out.append(Variant(f"spec:{Path(path).stem}", "spec", {"spec": spec.describe()}, spec))
    for path in loads:
        spec = SwapSpec.from_dict(check_saved(path)["spec"])  # a missing, corrupt or truncated directory fails here
        spec.validate()
        out.append(Variant(f"saved:{Path(path).name}", "saved", {"spec": spec.describe(), "dir": str(path)},
                           Saved(path)))
    return out


def check_variants(variants: list[Variant], model, seq_len: int | None = None, named: bool = True) -> None:
    """Each variant against the model's layers (`model`: its skeleton, `attnlab.models.skeleton`) and, with
    `seq_len`, the run's length, before the load: a selector that picks no layer, a method that cannot run a layer
    (causal, sliding window) or the length, a saved attention of another architecture fail in one line. `named`: the
    methods were asked for by name; the default list keeps the methods this model cannot run, as rows saying why."""
    from ..adapters.swap import check

    for v in variants:
        if v.method in ("spec", "saved"):
            try:
                if v.method == "saved":  # saved for another model (layers, heads): the skeleton tells, unloaded
                    check_fingerprint(model, read_meta(v.target.path), v.target.path)
                plans = check(model, v.target if isinstance(v.target, SwapSpec) else v.target.spec(), seq_len)
                if changes_nothing(plans):
                    raise AttnlabError("the spec leaves every layer its original attention: its row would be the "
                                       "original's")
            except AttnlabError as e:
                raise type(e)(f"{v.label}: {e}") from None  # which file
        elif named:
            check(model, v.target, seq_len)


def _attn_peak(variant: Variant, model, seq_len: int, device, dtype) -> int | None:
    """Peak memory of ONE attention call at the model's shape (B=1), the part a method changes (single-method
    variants only)."""
    from ..adapters import hf

    if variant.method in ("spec", "saved"):
        return None
    sites = hf.attention_modules(model)
    heads, kv, d = hf.head_shape(sites[0][1], model.config)
    plan = variant.target.plan([n for n, _ in sites])[0]  # layer 0 as the swap builds it (its seed, its `layer`)
    m = registry.make(plan.method, head_dim=d, num_heads=heads, num_kv_heads=kv, **plan.options).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, heads, seq_len, d, generator=g).to(device, dtype)
    k = torch.randn(1, kv, seq_len, d, generator=g).to(device, dtype)
    v = torch.randn(1, kv, seq_len, d, generator=g).to(device, dtype)
    causal = bool(getattr(sites[0][1], "is_causal", False))
    with torch.no_grad():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            m(q, k, v, causal=causal)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        return fm.peak_cpu_memory(lambda: m(q, k, v, causal=causal))


def compare_lm(model, windows: torch.Tensor, specs: list[Variant], *, grad_tokens: int = 128, progress: bool = True,
               on_row=None) -> list[dict]:
    """One row per method. `windows`: LongTensor [N, T] of held-out text. `on_row(row)`: called as each row is done."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    windows = windows.to(device)
    seq_len = windows.shape[1]
    rows = []
    bar = tqdm(total=len(specs) + 1, desc="compare", disable=not progress)
    bar.set_postfix_str("original model")
    base_logits, base_ms = [], []
    with torch.no_grad():
        for w in windows:
            with Timer(device) as t:
                base_logits.append(model(w[None]).logits.float().cpu())
            base_ms.append(t.ms)
    grad_ids = windows[:1, :grad_tokens]
    base_grad = fm.lm_grads(model, grad_ids)
    _, ref_probs = fm.swapped_probs(model, windows[:1], "dense")  # dense == original, with its probs
    bar.update()
    for spec in specs:
        bar.set_postfix_str(spec.label)
        row = {"method": spec.label, "options": spec.options, "status": "ok"}
        try:
            with swapped(model, spec.target):
                stats, ms = [], []
                with torch.no_grad():
                    for i, w in enumerate(windows):
                        with Timer(device) as t:
                            logits = model(w[None]).logits.float().cpu()
                        ms.append(t.ms)
                        stats.append(fm.next_token_stats(base_logits[i], logits, w[None].cpu()))
            kl = torch.cat([s["kl"] for s in stats])
            row.update(
                kl_mean=kl.mean().item(), kl_p95=kl.quantile(0.95).item(),
                top1_agree=torch.cat([s["agree"] for s in stats]).mean().item(),
                ppl_base=torch.cat([s["nll_base"] for s in stats]).mean().exp().item(),
                ppl_new=torch.cat([s["nll_new"] for s in stats]).mean().exp().item(),
                ms_per_window=statistics.median(ms), ms_per_window_base=statistics.median(base_ms),
            )
            row["attn_mse"] = None
            if spec.has_probs():
                _, probs = fm.swapped_probs(model, windows[:1], spec.target)
                row["attn_mse"] = fm.probs_mse(ref_probs, probs, causal=True)
                del probs
            row["grad_cos"], _ = fm.grad_cosine(model, grad_ids, spec.target, base_grad)
            row["attn_peak_bytes"] = _attn_peak(spec, model, seq_len, device, dtype)
        except UnsupportedError as e:
            row.update(status="unsupported", reason=str(e))
        row["targets_met"] = {m: fm.meets(m, row.get(m)) for m in ("kl_mean", "attn_mse", "grad_cos")}
        rows.append(row)
        if on_row is not None:
            on_row(row)
        bar.update()
    bar.close()
    return rows


# ---- encoder classification: Spam Assassin ------------------------------------------------------------------
def _embed(model, tok, texts, seq_len, batch_size=32, desc="embed", progress=True) -> torch.Tensor:
    device = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, leave=False, disable=not progress):
            enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=seq_len, return_tensors="pt").to(device)
            h = model(**enc).last_hidden_state.float()  # (B, T, E)
            m = enc["attention_mask"].unsqueeze(-1).float()
            outs.append(((h * m).sum(1) / m.sum(1).clamp_min(1)).cpu())  # mean pooling over real tokens
    return torch.cat(outs)


def train_head(x: torch.Tensor, y: torch.Tensor, steps: int = 300, l2: float = 1e-3) -> torch.nn.Linear:
    """Logistic regression on frozen embeddings (full-batch LBFGS, fp32, standardised inputs folded in)."""
    torch.manual_seed(0)
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    head = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(head.parameters(), max_iter=steps, line_search_fn="strong_wolfe")
    xs = (x - mu) / sd

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(xs).squeeze(-1), y.float())
        loss = loss + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():  # fold the standardisation into the layer
        head.weight /= sd
        head.bias -= (head.weight * mu).sum()
    return head


def compare_spam(model, tok, train, test, specs: list[Variant], *, seq_len: int, progress: bool = True,
                 on_row=None) -> list[dict]:
    """One row per method (the original first): accuracy of a head trained on the original's embeddings.
    `on_row(row)`: called as each row is done."""
    xtr = _embed(model, tok, [t for t, _ in train], seq_len, desc="embed train", progress=progress)
    ytr = torch.tensor([y for _, y in train])
    yte = torch.tensor([y for _, y in test])
    head = train_head(xtr, ytr)
    texts = [t for t, _ in test]

    def acc(x):
        with torch.no_grad():
            return ((head(x).squeeze(-1) > 0).long() == yte).float().mean().item()

    t0 = time.perf_counter()
    base_acc = acc(_embed(model, tok, texts, seq_len, desc="original", progress=progress))
    base_s = time.perf_counter() - t0
    rows = [{"method": "original", "options": {}, "status": "ok", "accuracy": base_acc, "acc_retention": 1.0,
             "seconds": base_s}]
    if on_row is not None:
        on_row(rows[0])
    for spec in tqdm(specs, desc="compare", disable=not progress):
        row = {"method": spec.label, "options": spec.options, "status": "ok"}
        try:
            with swapped(model, spec.target):
                t0 = time.perf_counter()
                a = acc(_embed(model, tok, texts, seq_len, desc=spec.label, progress=progress))
            row.update(accuracy=a, acc_retention=a / base_acc, seconds=time.perf_counter() - t0)
        except UnsupportedError as e:
            row.update(status="unsupported", reason=str(e))
        row["targets_met"] = {"acc_retention": fm.meets("acc_retention", row.get("acc_retention"))}
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows
