"""Block patterns: the sequence cut into blocks of `block_size`; query block a sees key block b iff
layout[a, b] (Sparse Transformer, Child et al. 2019; BigBird, Zaheer et al. 2020). A layout may be one
Bool[nq_blocks, nk_blocks] for every head or Bool[H, nq_blocks, nk_blocks] per head (learned and data-informed
masks). Blocks index raw key positions; a query block is the queries at positions [a*bs, (a+1)*bs) counted
bottom-right (pos(i) = i + Tk - Tq), so a layout made for self-attention also serves decoding.

- `BlockPattern(layout, block_size)`: a fixed layout, a buffer. `BlockPattern.from_blocks(tensor)` is the
  constructor for learned and measured masks; `set_blocks(tensor)` replaces it (cached BlockMasks dropped).
- `BigBirdPattern(...)`: BigBird's recipe (global + window + random blocks), made per length, seeded.
"""
from __future__ import annotations

import functools

import torch

from .base import MaskMod, Pattern, causal_mod, const


def block_layout_mod(layout: torch.Tensor, block_size: int, offset: int = 0, device=None) -> MaskMod:
    """layout[(h,) pos(i) // bs, j // bs]; pos(i) = max(0, i + offset) (queries before the first key, Tq > Tk,
    read the first block row)."""
    table = layout.to(device=device, dtype=torch.bool)
    bs, off = const(block_size, device), const(offset, device)
    if table.dim() == 3:
        def head_block_mask(b, h, q_idx, kv_idx):
            return table[h, (q_idx + off).clamp(min=0) // bs, kv_idx // bs]

        return head_block_mask

    def block_mask(b, h, q_idx, kv_idx):
        return table[(q_idx + off).clamp(min=0) // bs, kv_idx // bs]

    return block_mask


def aligned(layout_block: int, tq: int, tk: int, block_size: int) -> bool:
    """`Pattern.blockwise` of a layout of `layout_block`-token blocks under a BlockMask of `block_size`: every
    BlockMask block lies inside one layout block when block_size divides layout_block and the query positions'
    offset Tk - Tq is a whole number of layout blocks (so pos(i) // layout_block, clamped at 0, is constant on each
    query block)."""
    return layout_block % block_size == 0 and (tk - tq) % layout_block == 0


def layout_chunks(layout: torch.Tensor, tq: int, tk: int, block_size: int, *, causal: bool, device):
    """One chunk per block of query positions: the key indices of its kept key blocks (any head's, for a
    per-head layout; the mask_mod then picks per head), future blocks dropped when causal."""
    off = tk - tq
    keep = layout.to("cpu", torch.bool)
    if keep.dim() == 3:
        keep = keep.any(0)
    first_block = max(0, off) // block_size
    last_block = max(0, tq - 1 + off) // block_size
    for qb in range(first_block, last_block + 1):
        s = 0 if qb == first_block else qb * block_size - off  # rows before the first key join the first block
        e = min(tq, (qb + 1) * block_size - off)
        if e <= s:
            continue
        kbs = keep[qb].nonzero().flatten().tolist() if qb < keep.shape[0] else []
        if causal:
            kbs = [kb for kb in kbs if kb * block_size <= e - 1 + off]
        idx = [torch.arange(kb * block_size, min((kb + 1) * block_size, tk)) for kb in kbs if kb * block_size < tk]
        kidx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
        yield s, e, kidx.to(device)


class BlockPattern(Pattern):
    """A fixed block layout (a buffer). Inputs longer than it covers are refused before compute."""

    def __init__(self, layout, block_size: int):
        super().__init__()
        self.block_size = int(block_size)
        lay = torch.as_tensor(layout)
        self.register_buffer("layout", self._checked(lay))

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, block_size: int) -> "BlockPattern":
        """From a Bool[nq_blocks, nk_blocks] or Bool[H, nq_blocks, nk_blocks] tensor (True = attend)."""
        return cls(blocks, block_size)

    @staticmethod
    def _checked(lay: torch.Tensor) -> torch.Tensor:
        from ..types import OptionError

        if lay.dim() not in (2, 3) or lay.numel() == 0 or lay.is_floating_point() or lay.is_complex():
            raise OptionError(f"a block layout must be a non-empty Bool[nq, nk] or Bool[H, nq, nk], got "
                              f"{tuple(lay.shape)} {lay.dtype}")
        return lay.to(torch.bool)

    def set_blocks(self, blocks: torch.Tensor) -> None:
        """Replace the layout (same shape), e.g. after a training step of a learned mask."""
        blocks = self._checked(torch.as_tensor(blocks))
        if blocks.shape != self.layout.shape:
            from ..types import OptionError

            raise OptionError(f"set_blocks: layout shape {tuple(blocks.shape)} != {tuple(self.layout.shape)}")
        self.layout.copy_(blocks)
        self.touch()

    @property
    def per_head(self) -> bool:
        return self.layout.dim() == 3

    @property
    def num_heads(self) -> int:
        return self.layout.shape[0]

    def extra_repr(self) -> str:
        return f"layout={tuple(self.layout.shape)}, block_size={self.block_size}"

    def version_key(self) -> tuple:
        return (*super().version_key(), self.block_size)

    def covers(self, tq, tk):
        nq, nk = self.layout.shape[-2:]
        bs = self.block_size
        if tk > min(nq, nk) * bs:  # query positions run up to Tk - 1 (bottom-right)
            return (f"its block layout [{nq}, {nk}] with block_size={bs} covers positions up to "
                    f"{min(nq, nk) * bs}, got Tk={tk}")
        return None

    def _mask_mod(self, offset, device):
        return block_layout_mod(self.layout, self.block_size, offset, device)

    def block_tables(self, nb, bs, causal):
        if bs % self.block_size:
            return None
        f = bs // self.block_size  # flex blocks of f x f layout blocks
        lay = self.layout if self.layout.dim() == 3 else self.layout[None]  # (H|1, nq, nk)
        n = nb * f
        lay = torch.nn.functional.pad(lay, (0, max(0, n - lay.shape[-1]), 0, max(0, n - lay.shape[-2])))[:, :n, :n]
        blocks = lay.reshape(lay.shape[0], nb, f, nb, f)
        a = torch.arange(nb)[:, None]
        b = torch.arange(nb)[None, :]
        any_ = blocks.any(4).any(2).cpu()
        full = blocks.all(4).all(2).cpu()
        if causal:
            any_ = any_ & (b <= a)
            full = full & (b < a)
        return any_, full

    def blockwise(self, tq, tk, block_size):
        return aligned(self.block_size, tq, tk, block_size)

    def key_chunks(self, tq, tk, causal):
        return layout_chunks(self.layout, tq, tk, self.block_size, causal=causal, device=self.device)


@functools.lru_cache(maxsize=128)
def bigbird_layout(tq: int, tk: int, block_size: int, causal: bool, num_global: int, num_window: int,
                   num_random: int, seed: int) -> torch.Tensor:
    """BigBird's block layout Bool[ceil(Tk/bs), ceil(Tk/bs)] over positions, deterministic in its arguments."""
    nb = -(-tk // block_size)
    layout = torch.zeros(nb, nb, dtype=torch.bool)
    layout[:, :num_global] = True
    gen = torch.Generator().manual_seed(seed)
    left = num_window // 2  # an even band leans left: under causal the right side would be masked anyway
    for qb in range(nb):
        if qb < num_global:
            layout[qb] = True  # global queries see every key
            continue
        layout[qb, max(0, qb - left): max(0, qb - left + num_window)] = True
        reachable = nb if not causal else qb + 1  # random future blocks would be masked: don't waste them
        cand = (~layout[qb, :reachable]).nonzero().flatten()
        pick = cand[torch.randperm(len(cand), generator=gen)[:num_random]]
        layout[qb, pick] = True
    return layout


class BigBirdPattern(Pattern):
    """BigBird's recipe, made per length from a seed: `num_global` leading blocks that see and are seen by
    everything, a band of `num_window` blocks on the diagonal, `num_random` random key blocks per query block."""

    def __init__(self, block_size: int, num_global: int = 1, num_window: int = 3, num_random: int = 2, seed: int = 0):
        super().__init__()
        self.block_size, self.num_global, self.num_window = int(block_size), int(num_global), int(num_window)
        self.num_random, self.seed = int(num_random), int(seed)

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, global={self.num_global}, window={self.num_window}, "
                f"random={self.num_random}, seed={self.seed}")

    def version_key(self) -> tuple:
        return (*super().version_key(), self.block_size, self.num_global, self.num_window, self.num_random, self.seed)

    def layout_for(self, tq: int, tk: int, causal: bool) -> torch.Tensor:
        return bigbird_layout(tq, tk, self.block_size, causal, self.num_global, self.num_window, self.num_random,
                              self.seed)

    def mask_mod(self, tq, tk, causal=False, device=None):
        # the layout depends on (Tq, Tk, causal): built here rather than in _mask_mod
        from .base import and_masks

        device = self.device if device is None else device
        mod = block_layout_mod(self.layout_for(tq, tk, causal), self.block_size, tk - tq, device)
        return and_masks(mod, causal_mod(tk - tq, device)) if causal else mod

    def blockwise(self, tq, tk, block_size):
        return aligned(self.block_size, tq, tk, block_size)

    def key_chunks(self, tq, tk, causal):
        return layout_chunks(self.layout_for(tq, tk, causal), tq, tk, self.block_size, causal=causal, device=self.device)
