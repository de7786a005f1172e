"""Fidelity metrics: next-token KL(P_original || P_swapped), top-1 agreement, perplexity, attention-probability
MSE, gradient cosine. Everything is computed in fp32 (or better) against the unmodified model on the same batch.

Targets (the research this project follows): attention-prob MSE <= 1e-4, gradient cosine >= 0.95,
next-token KL <= 1e-3 nats/token, accuracy retention >= 95%.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..adapters import hf
from ..adapters.swap import swapped

TARGETS = {"kl_mean": ("<=", 1e-3), "attn_mse": ("<=", 1e-4), "grad_cos": (">=", 0.95), "acc_retention": (">=", 0.95)}


def meets(metric: str, value) -> bool | None:
    if value is None or metric not in TARGETS:
        return None
    op, bound = TARGETS[metric]
    return bool(value <= bound) if op == "<=" else bool(value >= bound)


def kl_per_token(base_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_base || P_new) per position, in nats, fp32: [..., V] -> [...]."""
    lp = F.log_softmax(base_logits.float(), dim=-1)
    lq = F.log_softmax(new_logits.float(), dim=-1)
    p = lp.exp()
    # 0 * log(0 / q) = 0: a token the base model rules out (logit -inf) contributes nothing, not NaN
    terms = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)


def next_token_stats(base_logits: torch.Tensor, new_logits: torch.Tensor, input_ids: torch.Tensor) -> dict:
    """Per-window statistics for next-token prediction (positions 0..T-2 predict tokens 1..T-1)."""
    b, n = base_logits[:, :-1], new_logits[:, :-1]
    target = input_ids[:, 1:]
    kl = kl_per_token(b, n).flatten()
    nll_b = F.cross_entropy(b.float().flatten(0, 1), target.flatten(), reduction="none")
    nll_n = F.cross_entropy(n.float().flatten(0, 1), target.flatten(), reduction="none")
    agree = (b.argmax(-1) == n.argmax(-1)).flatten().float()
    return {"kl": kl, "nll_base": nll_b, "nll_new": nll_n, "agree": agree}


def summarise(stats: list[dict]) -> dict:
    """The held-out summary of per-window `next_token_stats`: KL mean and p95, top-1 agreement, perplexity of the
    new and of the base model."""
    def cat(key):
        return torch.cat([s[key] for s in stats])

    kl = cat("kl")
    return {"kl": kl.mean().item(), "kl_p95": kl.quantile(0.95).item(), "top1": cat("agree").mean().item(),
            "ppl": cat("nll_new").mean().exp().item(), "ppl_original": cat("nll_base").mean().exp().item()}


@contextlib.contextmanager
def capture_probs(model):
    """Within the block, every swapped attention layer keeps its implied probs (module.attnlab_probs)."""
    mods = [m for _, m in hf.attention_modules(model)]
    for m in mods:
        m.attnlab_capture = True
        m.attnlab_probs = None  # stays None for a layer left original
    try:
        yield mods
    finally:
        for m in mods:
            m.attnlab_capture = False
            m.attnlab_probs = None


def probs_mse(ref: list[torch.Tensor], new: list[torch.Tensor], *, causal: bool, attention_mask=None) -> float:
    """Mean squared difference of per-layer attention probabilities [B, H, T, T], over every layer and head and
    over the entries a query may see (causal lower triangle, real keys and queries)."""
    t = ref[0].shape[-1]
    visible = torch.ones(t, t, dtype=torch.bool, device=ref[0].device)
    if causal:
        visible = visible.tril()
    if attention_mask is not None:
        real = attention_mask.bool().to(visible.device)
        visible = visible[None, None] & real[:, None, None, :] & real[:, None, :, None]
    sq, count = 0.0, 0
    for r, n in zip(ref, new):
        if n is None:  # a layer left original: its probs are the reference's
            n = r
        vis = visible.expand_as(r)
        sq += ((r.float() - n.float()) ** 2)[vis].sum().item()
        count += int(vis.sum())
    return sq / max(count, 1)


def swapped_probs(model, input_ids, target, attention_mask=None) -> tuple[torch.Tensor, list]:
    """(logits, per-layer implied attention probs) of `model` with `target` swapped in (a method name, a
    SwapSpec / per-layer spec, or attnlab.Saved(DIR)). Layers the target leaves original give None."""
    kw = {} if attention_mask is None else {"attention_mask": attention_mask}
    with torch.no_grad(), swapped(model, target), capture_probs(model) as mods:
        out = model(input_ids, **kw)
        logits = out.logits if hasattr(out, "logits") else out.last_hidden_state
        return logits, [m.attnlab_probs for m in mods]


def attention_mse(model, input_ids: torch.Tensor, target, attention_mask=None) -> float:
    """Attention-probability MSE of `target` vs dense. The reference is `dense` swapped in, which reproduces
    the original model (tested to 1e-4 on logits)."""
    _, ref = swapped_probs(model, input_ids, "dense", attention_mask)
    _, new = swapped_probs(model, input_ids, target, attention_mask)
    causal = any(getattr(m, "is_causal", False) for _, m in hf.attention_modules(model))
    return probs_mse(ref, new, causal=causal, attention_mask=attention_mask)


def lm_grads(model, input_ids, attention_mask=None) -> torch.Tensor:
    """Flattened gradient of the LM loss w.r.t. every model parameter except the swapped methods' own."""
    params = [p for n, p in model.named_parameters() if "attnlab_method" not in n and p.requires_grad]
    model.zero_grad(set_to_none=True)
    out = model(input_ids, labels=input_ids, attention_mask=attention_mask)
    grads = list(torch.autograd.grad(out.loss, params, allow_unused=True))
    flat = torch.empty(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    i = 0
    for j, p in enumerate(params):  # into one preallocated vector, each gradient freed once copied
        n = p.numel()
        if grads[j] is None:
            flat[i:i + n] = 0
        else:
            flat[i:i + n] = grads[j].reshape(-1)
        grads[j] = None
        i += n
    return flat


def grad_cosine(model, input_ids: torch.Tensor, target, base_grad: torch.Tensor | None = None) -> tuple[float, torch.Tensor]:
    """Cosine between the parameter gradients of the LM loss with the original attention and with `target`.
    Returns (cosine, base_grad) so callers can reuse the base gradient across methods."""
    if base_grad is None:
        base_grad = lm_grads(model, input_ids)
    with swapped(model, target):
        new = lm_grads(model, input_ids)
    return cosine(base_grad, new), base_grad


def cosine(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 22) -> float:
    """Cosine of two flat vectors, accumulated in float64 a chunk at a time: the whole-vector float64 copies of
    F.cosine_similarity cost ~5 GB for SmolLM2's 135M-entry gradients (most of `attnlab compare`'s 9 GB peak)."""
    dot = na = nb = 0.0
    for s in range(0, a.numel(), chunk):
        x, y = a[s:s + chunk].double(), b[s:s + chunk].double()
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    return dot / max((na * nb) ** 0.5, 1e-300)


@contextlib.contextmanager
def _fd2_silenced():
    """Send file descriptor 2 to /dev/null for the block: the profiler's C++ side prints "USDT: ...
    profiler_start / profiler_stop" lines there at every start and stop, which no setting turns off."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_cpu_memory(fn) -> int:
    """Peak bytes allocated by torch on the CPU while `fn()` runs (profiler memory events; CPU has no
    max_memory_allocated). Allocations held before the call are not counted. Only the profiler's start and
    stop run with stderr silenced, not `fn`."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _fd2_silenced():
        prof.__enter__()
    try:
        fn()
    finally:
        with _fd2_silenced():
            prof.__exit__(None, None, None)
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    cur = peak = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return int(peak)
