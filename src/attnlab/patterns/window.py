"""Sliding window (Longformer's local band; Mistral's window when causal) plus StreamingLLM's attention sinks:
query i sees keys j with |pos(i) - j| <= window, and the first `sinks` keys, pos(i) = i + Tk - Tq."""
from __future__ import annotations

import torch

from .base import MaskMod, Pattern, const, or_masks


def sliding_window_mod(window: int, offset: int = 0, device=None) -> MaskMod:
    """|(i + offset) - j| <= window (both sides; AND with causal for one side)."""
    w, off = const(window, device), const(offset, device)

    def sliding_window_mask(b, h, q_idx, kv_idx):
        return (q_idx + off - kv_idx).abs() <= w

    return sliding_window_mask


def sinks_mod(num_sinks: int, device=None) -> MaskMod:
    """The first `num_sinks` keys are visible to every query."""
    n = const(num_sinks, device)

    def sink_mask(b, h, q_idx, kv_idx):
        return kv_idx < n

    return sink_mask


class WindowPattern(Pattern):
    def __init__(self, window: int, sinks: int = 0):
        super().__init__()
        self.window, self.sinks = int(window), int(sinks)

    @property
    def shift_invariant(self) -> bool:
        return not self.sinks

    def extra_repr(self) -> str:
        return f"window={self.window}, sinks={self.sinks}"

    def version_key(self) -> tuple:
        return (*super().version_key(), self.window, self.sinks)

    def _mask_mod(self, offset, device):
        mod = sliding_window_mod(self.window, offset, device)
        return or_masks(mod, sinks_mod(self.sinks, device)) if self.sinks else mod

    def covers_diagonal_block(self, block_size):
        return self.window >= block_size - 1

    def block_tables(self, nb, bs, causal):
        a = torch.arange(nb)[:, None]
        b = torch.arange(nb)[None, :]
        near = a * bs - ((b + 1) * bs - 1)  # i - j at the closest pair of the block pair (negative: b after a)
        far = (a + 1) * bs - 1 - b * bs  # i - j at the farthest pair
        w = self.window
        if causal:
            any_ = (b <= a) & (near <= w)
            full = (b < a) & (far <= w)
        else:
            closest = torch.where(b < a, near, torch.where(b > a, b * bs - ((a + 1) * bs - 1), torch.zeros_like(near)))
            any_ = closest <= w
            full = torch.maximum(far, (b + 1) * bs - 1 - a * bs) <= w
        if self.sinks:
            sink_any = (b * bs < self.sinks) & ((b <= a) if causal else torch.ones_like(any_))
            sink_full = ((b + 1) * bs <= self.sinks) & ((b < a) if causal else torch.ones_like(any_))
            any_, full = any_ | sink_any, full | sink_full
        return any_[None], full[None]

    def visible_pairs(self, tq: int, tk: int, causal: bool, max_evaluations: int = 1 << 28) -> float:
        """Closed form, O(Tq): row i (at position p = i + Tk - Tq) keeps the band [max(0, p - w), min(Tk - 1, p + w)]
        (causal: up to p) and the sinks outside it (causal: those at or before p)."""
        p = torch.arange(tq, dtype=torch.float64) + (tk - tq)
        lo = torch.clamp(p - self.window, min=0)
        hi = torch.clamp(p if causal else p + self.window, max=tk - 1)
        band = torch.clamp(hi - lo + 1, min=0)
        # the sinks the row may see (causal: only up to p), less those already inside the band
        s_eff = torch.clamp(torch.minimum(p + 1, torch.full_like(p, float(min(self.sinks, tk)))), min=0) if causal \
            else torch.full_like(p, float(min(self.sinks, tk)))
        inside = torch.clamp(torch.minimum(hi, s_eff - 1) - lo + 1, min=0)
        return float((band + s_eff - inside).sum())

    def density(self, tq: int, tk: int, causal: bool = True) -> float:
        """Closed form for causal self-attention (row i keeps min(i, w) + 1 band keys and the sinks below the band);
        the generic count otherwise."""
        if not (causal and tq == tk):
            return super().density(tq, tk, causal)
        i = torch.arange(tq, dtype=torch.float64)
        band = torch.clamp(i, max=self.window) + 1
        sinks = torch.clamp(torch.clamp(i - self.window, min=0), max=self.sinks)
        return float((band + sinks).sum() / (tq * (tq + 1) / 2))

    @classmethod
    def for_density(cls, density: float, seq_len: int, sinks: int = 0) -> "WindowPattern":
        """The causal window (+ sinks) whose density at seq_len is closest to `density` (binary search)."""
        lo, hi = 0, seq_len
        while lo < hi:
            mid = (lo + hi) // 2
            if cls(mid, sinks).density(seq_len, seq_len, True) < density:
                lo = mid + 1
            else:
                hi = mid
        best = min((max(0, lo - 1), lo), key=lambda w: abs(cls(w, sinks).density(seq_len, seq_len, True) - density))
        return cls(best, sinks)

    def key_chunks(self, tq, tk, causal, chunk: int | None = None):
        """The band [s+off-w, e-1+off+w] (causal: up to e-1+off) and the sinks before it; chunks of at least 64
        queries so the Python loop stays short for small windows."""
        off, w, device = tk - tq, self.window, self.device
        chunk = chunk or max(w, self.chunk_queries)
        for s in range(0, tq, chunk):
            e = min(s + chunk, tq)
            lo = max(0, s + off - w)
            hi = min(tk, e - 1 + off + (0 if causal else w) + 1)
            band = torch.arange(lo, max(lo, hi), device=device)
            sink = torch.arange(min(self.sinks, lo, tk), device=device)
            yield s, e, torch.cat([sink, band])
