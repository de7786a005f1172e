"""`attnlab compare`: swap each method into a real model and measure how far it moves, without fine-tuning.

Two tasks:
- "lm" (causal LM, default SmolLM2-135M on held-out Moby Dick windows): next-token KL vs the original,
  top-1 agreement, perplexity of both, attention-probability MSE, gradient cosine, time and memory.
- "spam" (encoder, default all-MiniLM-L6-v2 on Spam Assassin): a logistic-regression head trained on frozen
  dense mean-pooled embeddings; test accuracy of the original and of each method swapped in.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import registry
from .adapters.swap import swapped
from .metrics import fidelity as fm
from .types import AttnlabError, UnsupportedError

# Options used when a method is compared at sequence length T (sensible for T ~ 128..4096).
def default_options(method: str, seq_len: int) -> dict:
    return {
        "window": {"window": max(16, seq_len // 4), "sinks": 4},
        "block_sparse": {"block_size": max(16, min(64, seq_len // 8))},
        "lsh": {"bucket_size": max(16, seq_len // 8), "n_hashes": 2, "shared_qk": False},
        "performer": {"num_features": 256},
        "rfa": {"num_features": 256},
        "nystrom": {"num_landmarks": max(8, min(64, seq_len // 4))},
        "linformer": {"max_len": seq_len, "proj_len": max(8, seq_len // 4)},
    }.get(method, {})


@dataclass
class Spec:
    method: str
    options: dict = field(default_factory=dict)


def resolve(methods: list[str] | None, overrides: list[str], seq_len: int, causal: bool) -> list[Spec]:
    """Method names (default: every registered method) + `--set method.option=value` overrides."""
    # references first, then the approximations alphabetically
    names = methods or sorted(registry.list_methods(), key=lambda n: (n not in ("dense", "sdpa"), n))
    for n in names:
        registry.get(n)  # unknown names fail here, listing the valid ones
    specs = {n: Spec(n, default_options(n, seq_len)) for n in names}
    for item in overrides:
        try:
            key, val = item.split("=", 1)
            meth, opt = key.split(".", 1)
        except ValueError:
            raise AttnlabError(f"--set expects method.option=value, got {item!r}") from None
        if meth not in specs:
            raise AttnlabError(f"--set {item!r}: method {meth!r} is not among the compared methods {list(specs)}")
        specs[meth].options[opt] = _parse(val)
    for s in specs.values():  # bad option names/values fail before any model work
        registry.make(s.method, head_dim=8, num_heads=1, **s.options)
    return list(specs.values())


def _parse(val: str):
    for cast in (int, float):
        try:
            return cast(val)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(val.lower(), val)


def environment(device) -> dict:
    import transformers

    dev = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return {"device": str(device), "device_name": dev, "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}


def _attn_peak(spec: Spec, model, seq_len: int, device, dtype) -> int | None:
    """Peak memory of ONE attention call at the model's shape (B=1), the part a method changes."""
    from .adapters import hf

    _, mod = hf.attention_modules(model)[0]
    heads, kv, d = hf.head_shape(mod, model.config)
    m = registry.make(spec.method, head_dim=d, num_heads=heads, num_kv_heads=kv, **spec.options).to(device)
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, heads, seq_len, d, generator=g).to(device, dtype)
    k = torch.randn(1, kv, seq_len, d, generator=g).to(device, dtype)
    v = torch.randn(1, kv, seq_len, d, generator=g).to(device, dtype)
    causal = bool(getattr(mod, "is_causal", False))
    with torch.no_grad():
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            m(q, k, v, causal=causal)
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        return fm.peak_cpu_memory(lambda: m(q, k, v, causal=causal))


def compare_lm(model, windows: torch.Tensor, specs: list[Spec], *, grad_tokens: int = 128, progress: bool = True) -> list[dict]:
    """One row per method. `windows`: LongTensor [N, T] of held-out text."""
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
            t = time.perf_counter()
            base_logits.append(model(w[None]).logits.float().cpu())
            base_ms.append((time.perf_counter() - t) * 1e3)
    grad_ids = windows[:1, :grad_tokens]
    base_grad = fm.lm_grads(model, grad_ids)
    _, ref_probs = fm.swapped_probs(model, windows[:1], "dense", {})  # dense == original, with its probs
    bar.update()
    for spec in specs:
        bar.set_postfix_str(spec.method)
        caps = registry.capabilities(spec.method)
        row = {"method": spec.method, "options": spec.options, "status": "ok"}
        try:
            with swapped(model, spec.method, **spec.options):
                stats, ms = [], []
                with torch.no_grad():
                    for i, w in enumerate(windows):
                        t = time.perf_counter()
                        logits = model(w[None]).logits.float().cpu()
                        ms.append((time.perf_counter() - t) * 1e3)
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
            if caps.probs:
                _, probs = fm.swapped_probs(model, windows[:1], spec.method, spec.options)
                row["attn_mse"] = fm.probs_mse(ref_probs, probs, causal=True)
                del probs
            row["grad_cos"], _ = fm.grad_cosine(model, grad_ids, spec.method, spec.options, base_grad)
            row["attn_peak_bytes"] = _attn_peak(spec, model, seq_len, device, dtype)
        except UnsupportedError as e:
            row.update(status="unsupported", reason=str(e))
        row["targets_met"] = {m: fm.meets(m, row.get(m)) for m in ("kl_mean", "attn_mse", "grad_cos")}
        rows.append(row)
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


def compare_spam(model, tok, train, test, specs: list[Spec], *, seq_len: int, progress: bool = True) -> list[dict]:
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
    for spec in tqdm(specs, desc="compare", disable=not progress):
        row = {"method": spec.method, "options": spec.options, "status": "ok"}
        try:
            with swapped(model, spec.method, **spec.options):
                t0 = time.perf_counter()
                a = acc(_embed(model, tok, texts, seq_len, desc=spec.method, progress=progress))
            row.update(accuracy=a, acc_retention=a / base_acc, seconds=time.perf_counter() - t0)
        except UnsupportedError as e:
            row.update(status="unsupported", reason=str(e))
        row["targets_met"] = {"acc_retention": fm.meets("acc_retention", row.get("acc_retention"))}
        rows.append(row)
    return rows
