"""Sparsity patterns as parts: what a sparse method attends to, separate from how it is computed (ops.sparse)."""
from .base import MaskMod, Pattern, UnionPattern, and_masks, causal_mod, dense_mask, or_masks
from .blocks import BigBirdPattern, BlockPattern, bigbird_layout, block_layout_mod, layout_chunks
from .window import WindowPattern, sinks_mod, sliding_window_mod

__all__ = [
    "BigBirdPattern", "BlockPattern", "MaskMod", "Pattern", "UnionPattern", "WindowPattern", "and_masks", "bigbird_layout",
    "block_layout_mod", "causal_mod", "dense_mask", "layout_chunks", "or_masks", "sinks_mod", "sliding_window_mod",
]
