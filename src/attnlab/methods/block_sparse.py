"""Block-sparse attention: the sequence is cut into blocks of `block_size`, and query block a sees key
block b iff layout[a, b] (Sparse Transformer, Child et al. 2019; BigBird, Zaheer et al. 2020).

The layout is either fixed (`layout`, Bool[nq_blocks, nk_blocks], True = keep; inputs longer than it
covers are refused before compute) or BigBird's recipe, made per length (seeded, cached):
`num_global_blocks` global blocks (every query sees them, and their queries see everything),
`num_window_blocks` blocks in a band centred on the diagonal, and `num_random_blocks` random extra
blocks per query row. Blocks index raw positions; causal (bottom-right for Tq != Tk, masks.py) and key
padding are applied on top. Exact limit: a layout that keeps every block.

Backends: "flex" runs compiled FlexAttention (BlockMask BLOCK_SIZE = block_size when it is a multiple of
128, else 128 with the layout resolved inside blocks by the mask_mod, since Triton tiles are 64-128 wide);
"torch" gathers, per query block, only the keys of its kept blocks (memory O(T * kept keys)), not a dense
masked matrix. need_probs builds the dense matrix under the same mask_mod.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from .. import sparse
from ..registry import register
from ..types import Capabilities, OptionError, UnsupportedError, check_choice, check_int, opt
from .base import AttentionMethod
from .dense import dense_attention

_RECIPE = {"num_global_blocks": 1, "num_window_blocks": 3, "num_random_blocks": 2, "seed": 0}


@functools.lru_cache(maxsize=128)
def bigbird_layout(tq: int, tk: int, block_size: int, causal: bool, num_global: int, num_window: int,
                   num_random: int, seed: int) -> torch.Tensor:
    """BigBird's block layout Bool[ceil(Tq/bs), ceil(Tk/bs)] for one length, deterministic in its arguments."""
    nqb, nkb, off = -(-tq // block_size), -(-tk // block_size), tk - tq
    layout = torch.zeros(nqb, nkb, dtype=torch.bool)
    layout[:, :num_global] = True
    gen = torch.Generator().manual_seed(seed)
    left = num_window // 2  # an even band leans left: under causal the right side would be masked anyway
    for qb in range(nqb):
        first = qb * block_size + off  # the absolute positions this query block spans
        last = min(qb * block_size + block_size, tq) - 1 + off
        if first < num_global * block_size:
            layout[qb] = True  # global queries see every key
            continue
        centre = min(max(last // block_size, 0), nkb - 1)
        layout[qb, max(0, centre - left): max(0, centre - left + num_window)] = True
        reachable = nkb if not causal else centre + 1  # random future blocks would be masked: don't waste them
        cand = (~layout[qb, :reachable]).nonzero().flatten()
        pick = cand[torch.randperm(len(cand), generator=gen)[:num_random]]
        layout[qb, pick] = True
    return layout


@register("block_sparse")
class BlockSparse(AttentionMethod):
    """Block-sparse attention over a fixed layout or BigBird's global + window + random recipe."""

    capabilities = Capabilities(causal=True, padding=True, attn_mask=False, probs=True)

    @dataclasses.dataclass
    class Options:
        block_size: int = opt(64, "tokens per block (layout granularity)")
        layout: object = opt(None, "Bool[nq_blocks, nk_blocks] (nested list or tensor, True = keep); None = BigBird recipe")
        num_global_blocks: int = opt(1, "recipe: leading blocks that see and are seen by everything")
        num_window_blocks: int = opt(3, "recipe: blocks in the band centred on the diagonal")
        num_random_blocks: int = opt(2, "recipe: random extra key blocks per query block")
        seed: int = opt(0, "recipe: seed of the random blocks (the layout is fixed per length)")
        backend: str = opt("auto", "auto (flex on CUDA, torch on CPU) | flex | torch")

        def __post_init__(self):
            check_int("block_sparse", "block_size", self.block_size, 1)
            for name in _RECIPE:
                check_int("block_sparse", name, getattr(self, name), 0)
            check_choice("block_sparse", "backend", self.backend, sparse.BACKENDS)
            if self.layout is not None:
                changed = [n for n, d in _RECIPE.items() if getattr(self, n) != d]
                if changed:
                    raise OptionError(f"block_sparse: pass either `layout` or the BigBird recipe, not both (got {changed})")
                try:
                    lay = torch.as_tensor(self.layout)
                except (TypeError, ValueError) as e:
                    raise OptionError(f"block_sparse: layout must be a 2D bool nested list or tensor ({e})") from None
                if lay.dim() != 2 or lay.numel() == 0 or lay.is_floating_point() or lay.is_complex():
                    raise OptionError(f"block_sparse: layout must be a non-empty 2D bool/int 0-1 grid, got {tuple(lay.shape)} {lay.dtype}")
                self.layout = lay.to("cpu", torch.bool)

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        if self.opts.layout is not None:  # tells the base check (and adapters) the key limit before compute
            self.max_len = self.opts.layout.shape[1] * self.opts.block_size

    def layout_for(self, tq: int, tk: int, causal: bool) -> torch.Tensor:
        o = self.opts
        if o.layout is None:
            return bigbird_layout(tq, tk, o.block_size, causal, o.num_global_blocks, o.num_window_blocks,
                                  o.num_random_blocks, o.seed)
        nq, nk = o.layout.shape
        if tq > nq * o.block_size or tk > nk * o.block_size:
            raise UnsupportedError(
                f"method 'block_sparse' cannot run this request: its layout [{nq}, {nk}] with block_size={o.block_size} "
                f"covers at most Tq={nq * o.block_size} queries and Tk={nk * o.block_size} keys, got Tq={tq}, Tk={tk}; "
                "pass a larger layout or use the BigBird recipe (layout=None)"
            )
        return o.layout

    def mask_mod(self, layout: torch.Tensor, tq: int, tk: int, causal: bool, device=None) -> sparse.MaskMod:
        mod = sparse.block_layout(layout, self.opts.block_size, device)
        return sparse.and_masks(mod, sparse.causal(tk - tq, device)) if causal else mod

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        o, tq, tk = self.opts, q.shape[-2], k.shape[-2]
        layout = self.layout_for(tq, tk, causal)
        backend = sparse.resolve_backend(o.backend, q.device)
        if backend == "flex":
            sparse.check_flex(self.name, q, k, v)
        if need_probs:
            allowed = sparse.dense_mask(self.mask_mod(layout, tq, tk, causal, q.device), tq, tk, q.device)
            return dense_attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=allowed, scale=scale)
        if backend == "flex":
            flex_block = o.block_size if o.block_size % 128 == 0 else 128
            bm = sparse.block_mask(
                ("block_sparse", sparse.layout_key(layout), o.block_size, causal),
                lambda dev: self.mask_mod(layout, tq, tk, causal, dev), None, None, tq, tk, q.device, flex_block,
            )
            return sparse.flex(q, k, v, bm, scale=scale, key_padding_mask=key_padding_mask), None
        chunks = sparse.layout_chunks(layout, tq, tk, o.block_size, causal=causal, device=q.device)
        out = sparse.gathered_attention(
            q, k, v, self.mask_mod(layout, tq, tk, causal, q.device), chunks, scale=scale,
            key_padding_mask=key_padding_mask,
        )
        return out, None
