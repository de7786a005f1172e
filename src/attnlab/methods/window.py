"""Sliding-window (local) attention with optional attention sinks.

Each query i sees keys j with |i - j| <= window (Longformer's local attention, Beltagy et al. 2020;
Mistral's sliding window when causal) plus the first `sinks` keys (StreamingLLM's attention sinks,
Xiao et al. 2023), subject to causal (j <= i) and key padding. With Tq != Tk query i sits at position
i + Tk - Tq (bottom-right, masks.py), for the band as well as for causal. Exact limit: window >= T.

Backends: "flex" runs compiled FlexAttention with a cached BlockMask (empty blocks skipped); "torch" runs
queries in chunks of max(window, 64) against the key band [start - window, end + window] plus the sinks,
masked exactly (O(T * window) memory, never a T x T mask). need_probs builds the dense matrix instead.
"""
from __future__ import annotations

import dataclasses

from .. import sparse
from ..registry import register
from ..types import Capabilities, check_choice, check_int, opt
from .base import AttentionMethod
from .dense import dense_attention


@register("window")
class Window(AttentionMethod):
    """Sliding-window attention (+ StreamingLLM sinks): O(T * window) instead of O(T^2)."""

    capabilities = Capabilities(causal=True, padding=True, attn_mask=False, probs=True)

    @dataclasses.dataclass
    class Options:
        window: int = opt(256, "keys with |i - j| <= window are visible (causal: also j <= i)")
        sinks: int = opt(0, "the first `sinks` keys are always visible (StreamingLLM attention sinks)")
        backend: str = opt("auto", "auto (flex on CUDA, torch on CPU) | flex | torch")
        block_size: int = opt(128, "FlexAttention BlockMask BLOCK_SIZE (keep a multiple of 128 on CUDA)")

        def __post_init__(self):
            check_int("window", "window", self.window, 0)
            check_int("window", "sinks", self.sinks, 0)
            check_int("window", "block_size", self.block_size, 1)
            check_choice("window", "backend", self.backend, sparse.BACKENDS)

    def mask_mod(self, tq: int, tk: int, causal: bool, device=None) -> sparse.MaskMod:
        off, o = tk - tq, self.opts
        mod = sparse.sliding_window(o.window, off, device)
        if o.sinks:
            mod = sparse.or_masks(mod, sparse.attention_sinks(o.sinks, device))
        if causal:
            mod = sparse.and_masks(mod, sparse.causal(off, device))
        return mod

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        o, tq, tk = self.opts, q.shape[-2], k.shape[-2]
        backend = sparse.resolve_backend(o.backend, q.device)
        if backend == "flex":
            sparse.check_flex(self.name, q, k, v)
        if need_probs:  # the implied matrix is T x T anyway: dense math under the same mask_mod
            allowed = sparse.dense_mask(self.mask_mod(tq, tk, causal, q.device), tq, tk, q.device)
            return dense_attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=allowed, scale=scale)
        if backend == "flex":
            bm = sparse.block_mask(
                ("window", o.window, o.sinks, causal), lambda dev: self.mask_mod(tq, tk, causal, dev),
                None, None, tq, tk, q.device, o.block_size,
            )
            return sparse.flex(q, k, v, bm, scale=scale, key_padding_mask=key_padding_mask), None
        chunks = sparse.band_chunks(tq, tk, window=o.window, sinks=o.sinks, causal=causal, device=q.device)
        out = sparse.gathered_attention(
            q, k, v, self.mask_mod(tq, tk, causal, q.device), chunks, scale=scale, key_padding_mask=key_padding_mask
        )
        return out, None
