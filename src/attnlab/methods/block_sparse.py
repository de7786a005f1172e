"""Block-sparse attention: the sequence is cut into blocks of `block_size`, and query block a sees key
block b iff layout[a, b] (Sparse Transformer, Child et al. 2019; BigBird, Zaheer et al. 2020).

The layout is either fixed (`layout`, Bool[nq_blocks, nk_blocks] or per head [H, nq_blocks, nk_blocks], True =
keep; a buffer of the pattern, so it is saved and moved with the module; inputs longer than it covers are
refused before compute) or BigBird's recipe, made per length from `seed` (the swap gives each layer its own):
`num_global_blocks` global blocks (every query sees them, and their queries see everything),
`num_window_blocks` blocks in a band on the diagonal, and `num_random_blocks` random extra blocks per query
row. Causal (bottom-right for Tq != Tk) and key padding are applied on top. Exact limit: every block kept.
"""
from __future__ import annotations

import dataclasses

import torch

from ..patterns import BigBirdPattern, BlockPattern
from ..registry import register
from ..types import OptionError, opt
from ._sparse import BACKENDS, SparseAttention, flex_block_for

_RECIPE = {"num_global_blocks": 1, "num_window_blocks": 3, "num_random_blocks": 2, "seed": 0}


@register("block_sparse")
class BlockSparse(SparseAttention):
    """Block-sparse attention over a fixed layout or BigBird's global + window + random recipe."""
    complexity = ("O(n k b d)", "O(n)", "b: block_size, k: blocks kept per row")

    @dataclasses.dataclass
    class Options:
        block_size: int = opt(64, "tokens per block (layout granularity)", low=1)
        layout: object = opt(None, "Bool[nq_blocks, nk_blocks] or [H, nq, nk] (nested list or tensor, True = keep); "
                                   "None = BigBird recipe", kind=object)
        num_global_blocks: int = opt(1, "recipe: leading blocks that see and are seen by everything", low=0)
        num_window_blocks: int = opt(3, "recipe: blocks in the band on the diagonal", low=0)
        num_random_blocks: int = opt(2, "recipe: random extra key blocks per query block", low=0)
        seed: int = opt(0, "recipe: seed of the random blocks (per layer from the swap seed)")
        backend: str = opt("auto", "auto (flex on CUDA, torch elsewhere) | flex | torch | triton (a fixed layout "
                                    "of 16-64-token blocks, self-attention)", choices=BACKENDS)

        def __post_init__(self):
            if self.layout is not None:  # (the seed is harmless with a layout: a swap gives every layer one)
                changed = [n for n, d in _RECIPE.items() if n != "seed" and getattr(self, n) != d]
                if changed:
                    raise OptionError(f"block_sparse: pass either `layout` or the BigBird recipe, not both (got {changed})")
                try:
                    lay = torch.as_tensor(self.layout)
                except (TypeError, ValueError) as e:
                    raise OptionError(f"block_sparse: layout must be a 2D/3D bool nested list or tensor ({e})") from None
                if lay.dim() not in (2, 3) or lay.numel() == 0 or lay.is_floating_point() or lay.is_complex():
                    raise OptionError(f"block_sparse: layout must be a non-empty 2D/3D bool/int 0-1 grid, got "
                                      f"{tuple(lay.shape)} {lay.dtype}")

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        o = self.opts
        if o.layout is not None:
            self.pattern = BlockPattern(torch.as_tensor(o.layout), o.block_size)
            if self.pattern.per_head and self.pattern.num_heads != num_heads:
                raise OptionError(f"block_sparse: a per-head layout has {self.pattern.num_heads} heads, the layer "
                                  f"{num_heads}")
        else:
            self.pattern = BigBirdPattern(o.block_size, o.num_global_blocks, o.num_window_blocks, o.num_random_blocks,
                                          o.seed)
        self.flex_block_size = flex_block_for(o.block_size)

    @classmethod
    def defaults(cls, seq_len):
        return {"block_size": max(16, min(128, seq_len // 8))}

    @classmethod
    def exact_limit(cls, tq, tk):
        bs = 16
        n = -(-max(tq, tk) // bs)
        return {"layout": [[True] * n] * n, "block_size": bs}

    @classmethod
    def test_options(cls, seq_len):
        return {"block_size": max(2, seq_len // 6)}
