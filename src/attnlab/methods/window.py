"""Sliding-window (local) attention with optional attention sinks.

Each query i sees keys j with |i - j| <= window (Longformer's local attention, Beltagy et al. 2020;
Mistral's sliding window when causal) plus the first `sinks` keys (StreamingLLM's attention sinks,
Xiao et al. 2023), subject to causal (j <= i) and key padding. With Tq != Tk query i sits at position
i + Tk - Tq (bottom-right, masks.py), for the band as well as for causal. Exact limit: window >= T.

The pattern is `patterns.WindowPattern`; `ops.sparse` runs it ("flex": compiled FlexAttention with a cached
BlockMask; "torch": query chunks against the key band plus the sinks, O(T * window) memory; "triton":
`ops.window_triton`, FlashAttention-2 kernels that visit only the band's and the sinks' tiles).
"""
from __future__ import annotations

import dataclasses

from ..patterns import WindowPattern
from ..registry import register
from ..types import opt
from ._sparse import BACKENDS, SparseAttention


@register("window")
class Window(SparseAttention):
    """Sliding-window attention (+ StreamingLLM sinks): O(T * window) instead of O(T^2)."""
    complexity = ("O(n (w + s) d)", "O(n)", "w: window, s: sinks; FlexAttention keeps no score matrix")

    @dataclasses.dataclass
    class Options:
        window: int = opt(256, "keys with |i - j| <= window are visible (causal: also j <= i)", low=0)
        sinks: int = opt(0, "the first `sinks` keys are always visible (StreamingLLM attention sinks)", low=0)
        backend: str = opt("auto", "auto (triton on CUDA in bf16 / fp16, flex in fp32, torch elsewhere) | flex | torch | triton "
                                   "(ops/window_triton.py: only the band's and sinks' tiles; CUDA)", choices=BACKENDS)
        block_size: int = opt(128, "FlexAttention BlockMask BLOCK_SIZE (keep a multiple of 128 on CUDA; below 16 the "
                                   "CPU flex template returns NaN, measured in torch 2.13)", low=16)

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        self.pattern = WindowPattern(self.opts.window, self.opts.sinks)
        self.flex_block_size = self.opts.block_size

    @classmethod
    def defaults(cls, seq_len):
        return {"window": min(256, max(16, seq_len // 4)), "sinks": 4}

    @classmethod
    def exact_limit(cls, tq, tk):
        return {"window": max(tq, tk)}

    @classmethod
    def test_options(cls, seq_len):
        return {"window": max(1, seq_len // 6), "sinks": 1}
