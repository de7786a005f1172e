"""`Pattern`: which (query, key) pairs may attend, as an nn.Module whose data are buffers.

    pattern.mask_mod(tq, tk, causal=True)   # fn(b, h, q_idx, kv_idx) -> Bool, FlexAttention's signature
    pattern.block_mask(tq, tk, causal, device, block_size)   # the cached FlexAttention BlockMask
    pattern.block_masks(tq, tk, causal, device, block_size)  # it and the compiled kernel's (partial_mask_mod inside)
    pattern.key_chunks(tq, tk, causal)      # (start, end, key indices) per query chunk: the plain-PyTorch kernel
    pattern.dense(tq, tk, causal)           # Bool[H|1, Tq, Tk], for need_probs and tests

Positions are bottom-right aligned (masks.py): with Tq != Tk, query i sits at key position i + Tk - Tq, for
the pattern as for causal. Pattern data (a block layout, learned or measured block scores) are buffers, so
they are saved in state_dict, moved by `.to()` and shared with nothing else.

The BlockMask cache lives on the pattern and is keyed by the pattern's identity and the *versions* of its
buffers (`tensor._version`, which every in-place change bumps, and the storage pointer, which a rebinding
changes) plus `touch()`'s counter: a pattern whose data change every training step never serves a stale
BlockMask, and building the key needs no device sync and no hash of the contents.

Pattern parameters captured by a mask_mod are 0-d tensors, not Python ints: torch.compile guards on captured
ints, so an int window would recompile flex_attention for every window size; a tensor reuses one kernel.
"""
from __future__ import annotations

import collections
from typing import Callable, Iterable

import torch
from torch import nn

from ..types import data_version

MaskMod = Callable[..., torch.Tensor]


def const(value, device=None) -> torch.Tensor:
    return torch.tensor(value, device=device)


def causal_mod(offset: int = 0, device=None) -> MaskMod:
    """Key j visible from query i iff j <= i + offset (offset = Tk - Tq: bottom-right alignment)."""
    off = const(offset, device)

    def causal_mask(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + off

    return causal_mask


def and_masks(*mods: MaskMod) -> MaskMod:
    from torch.nn.attention.flex_attention import and_masks as _and

    return _and(*mods)


def or_masks(*mods: MaskMod) -> MaskMod:
    from torch.nn.attention.flex_attention import or_masks as _or

    return _or(*mods)


def dense_mask(mask_mod: MaskMod, tq: int, tk: int, device=None, heads: int | None = None) -> torch.Tensor:
    """Bool[H|1, Tq, Tk] of a batch-independent mask_mod, by plain broadcasting: no vmap, no compile."""
    zero = torch.zeros((), dtype=torch.long, device=device)
    h = zero if heads is None else torch.arange(heads, device=device)[:, None, None]
    qi = torch.arange(tq, device=device)[:, None]
    kj = torch.arange(tk, device=device)[None, :]
    out = mask_mod(zero, h, qi, kj)
    return out.expand(heads or 1, tq, tk) if out.dim() == 3 else out.expand(tq, tk)[None].expand(heads or 1, tq, tk)


def block_mask_from_tables(any_: torch.Tensor, full: torch.Tensor, mask_mod: MaskMod, tq: int, tk: int, bs: int, device):
    """A FlexAttention BlockMask from block tables (Bool[H|1, nq, nk]): blocks in `full` skip the mask_mod, the
    other blocks in `any_` evaluate it; nothing is evaluated at token resolution (O(H nq nk) to build)."""
    from torch.nn.attention.flex_attention import BlockMask

    any_, full = any_.to(device), full.to(device)
    partial = any_ & ~full

    def ordered(table):  # counts [1, H, nq] and the True block indices first, ascending [1, H, nq, nk]
        idx = torch.argsort((~table).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return table.sum(-1).to(torch.int32)[None], idx[None]

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                    seq_lengths=(tq, tk))


class Pattern(nn.Module):
    """Base of every sparsity pattern. Subclasses write `_mask_mod(offset, device)` (the pattern alone, causal
    is added here) and, for an efficient plain-PyTorch kernel, `key_chunks`."""

    per_head = False  # True when the pattern depends on the head (its BlockMask then has an H dimension)
    # True when the pattern depends only on distances pos(i) - j (a band, causal): left padding cannot move it.
    # Otherwise it reads absolute key positions (sinks, a block grid), and a method running it counts them from
    # each row's first real key (methods.base.attend_from_first_key).
    shift_invariant = False
    chunk_queries = 64  # query rows per step of the default key_chunks

    def __init__(self):
        super().__init__()
        self._touched = 0
        self._block_masks: collections.OrderedDict = collections.OrderedDict()

    # ---- what subclasses write -----------------------------------------------------------------------------
    def _mask_mod(self, offset: int, device) -> MaskMod:
        raise NotImplementedError

    def key_chunks(self, tq: int, tk: int, causal: bool) -> Iterable[tuple[int, int, torch.Tensor]]:
        """(start, end, key indices): query rows [start, end) can only see the listed keys (no duplicates).
        The default lists every key (subclasses narrow it to what the pattern reaches)."""
        device = self.device
        for s in range(0, tq, self.chunk_queries):
            e = min(s + self.chunk_queries, tq)
            hi = min(tk, e - 1 + (tk - tq) + 1) if causal else tk
            yield s, e, torch.arange(0, max(0, hi), device=device)

    def covers(self, tq: int, tk: int) -> str | None:
        """Why the pattern cannot serve these lengths (None: it can). Fixed-size layouts override."""
        return None

    def block_tables(self, nb: int, bs: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(any, full): Bool[H|1, nb, nb] for self-attention in blocks of `bs` tokens: `any` where some pair of the
        block pair is allowed, `full` where every pair is (causal included). None: not known at block level; the
        BlockMask is then built by evaluating the mask_mod at token resolution."""
        return None

    def blockwise(self, tq: int, tk: int, block_size: int) -> bool:
        """True when the pattern's own verdict (causal aside) is constant on every block of a BlockMask of
        `block_size` tokens at (Tq, Tk): a block layout aligned with those blocks. Such a pattern is then cut only by
        the causal diagonal. False (the default) says nothing."""
        return False

    def covers_diagonal_block(self, block_size: int) -> bool:
        """True when the pattern keeps every pair 0 <= pos(i) - j < block_size (a band at least that wide): all the
        causal pairs of a BlockMask block on the diagonal, when Tk - Tq is a whole number of blocks."""
        return False

    def partial_mask_mod(self, tq: int, tk: int, causal: bool, device, block_size: int,
                         tables: bool = False) -> MaskMod | None:
        """What compiled FlexAttention need evaluate inside the BlockMask's partial blocks (blocks of `block_size`
        tokens; full blocks evaluate nothing, empty ones are skipped): `block_masks`' second. None: the whole
        mask_mod. A causal `blockwise` pattern is partial only where the diagonal cuts a block it keeps whole, so
        the causal comparison alone is its mask there: no per-pair table lookup (a gather and two int64 divisions).
        Non-causal blockwise layouts have no partial blocks but ragged tails: the whole mask_mod. `tables`: the
        BlockMask was built from `block_tables` (`block_masks` says), where a ragged last block the pattern keeps
        whole counts as full; built by evaluating the mask_mod, it counts as partial (positions past the end masked)."""
        return causal_mod(tk - tq, device) if causal and self.blockwise(tq, tk, block_size) else None

    # ---- shared mechanics ----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        for buf in self.buffers():
            return buf.device
        return torch.device("cpu")

    def mask_mod(self, tq: int, tk: int, causal: bool = False, device=None) -> MaskMod:
        device = self.device if device is None else device
        mod = self._mask_mod(tk - tq, device)
        return and_masks(mod, causal_mod(tk - tq, device)) if causal else mod

    def dense(self, tq: int, tk: int, causal: bool = False, device=None) -> torch.Tensor:
        """Bool[H|1, Tq, Tk]: True where query i may see key j."""
        device = self.device if device is None else device
        heads = self.num_heads if self.per_head else None
        return dense_mask(self.mask_mod(tq, tk, causal, device), tq, tk, device, heads)

    def visible_pairs(self, tq: int, tk: int, causal: bool, max_evaluations: int = 1 << 28) -> float | None:
        """(query, key) pairs the pattern keeps at (Tq, Tk), averaged over heads: the mask_mod evaluated on the
        keys `key_chunks` lists for each query chunk (what the torch kernel visits). None when that would take
        more than `max_evaluations` evaluations (a pattern whose key_chunks list every key, at a long length)."""
        chunks = list(self.key_chunks(tq, tk, causal))
        if sum((e - s) * len(k) for s, e, k in chunks) > max_evaluations:
            return None
        mod = self.mask_mod(tq, tk, causal, self.device)
        heads = self.num_heads if self.per_head else 1
        h = torch.arange(heads, device=self.device)[:, None, None]
        zero = torch.zeros((), dtype=torch.long, device=self.device)
        total = 0
        for s, e, kidx in chunks:
            if len(kidx):
                got = mod(zero, h, torch.arange(s, e, device=self.device)[:, None], kidx.to(self.device)[None, :])
                total += int(got.expand(heads, e - s, len(kidx)).sum()) if got.dim() == 3 else int(got.sum()) * heads
        return total / heads

    def density(self, tq: int, tk: int, causal: bool = True) -> float:
        """Fraction of the pairs allowed by causal (or all pairs) that the pattern keeps, averaged over heads."""
        allowed = self.dense(tq, tk, causal)
        if causal:
            total = int(dense_mask(causal_mod(tk - tq), tq, tk).sum()) * allowed.shape[0]
        else:
            total = allowed.numel()
        return float(allowed.sum()) / max(total, 1)

    def touch(self) -> None:
        """Say that the pattern's data changed in a way buffer versions cannot see (cached BlockMasks are dropped)."""
        self._touched += 1
        self._block_masks.clear()

    def version_key(self) -> tuple:
        """Identity and data version, for caches: no device sync, no content hash. Read on every call (twice: the
        request check and the BlockMask lookup), so it walks the pattern's own buffers and sub-patterns directly
        rather than through `buffers()`' generic traversal (measured ~60 us a call on the H200 host for a
        global_sparse pattern, under the profiler)."""
        return (id(self), self._touched, *(data_version(b) for b in self._buffers.values() if b is not None),
                *(m.version_key() if isinstance(m, Pattern) else tuple(data_version(b) for b in m.buffers())
                  for m in self._modules.values() if m is not None))

    def block_mask(self, tq: int, tk: int, causal: bool, device, block_size: int = 128):
        """The FlexAttention BlockMask of this pattern at (Tq, Tk), built once per data version and LRU-cached."""
        return self._block_mask(tq, tk, causal, device, block_size)[0]

    def _block_mask(self, tq: int, tk: int, causal: bool, device, block_size: int):
        """(BlockMask, whether it was built from `block_tables`): from the tables for self-attention where the
        pattern has them, else by evaluating the mask_mod at token resolution (`create_block_mask`)."""
        from torch.nn.attention.flex_attention import create_block_mask

        device = torch.device(device)
        heads = self.num_heads if self.per_head else None

        def make():
            nb = -(-tk // block_size)
            tables = self.block_tables(nb, block_size, causal) if tq == tk else None
            mod = self.mask_mod(tq, tk, causal, device)
            if tables is None:
                return create_block_mask(mod, None, heads, tq, tk, device=device, BLOCK_SIZE=block_size), False
            return block_mask_from_tables(*tables, mod, tq, tk, block_size, device), True
        return self.cached((tq, tk, causal, str(device), block_size), make)

    def block_masks(self, tq: int, tk: int, causal: bool, device, block_size: int = 128):
        """(`block_mask`, the kernel BlockMask) in one cache lookup (flex's hot path). The kernel BlockMask has the same
        blocks with `partial_mask_mod` inside the partial ones (the same object where the pattern has no cheaper
        mod); only compiled flex may run it, and on CPU only from torch 2.8: flex's eager form, and the CPU kernel of
        torch 2.6 and 2.7, evaluate the mask_mod on every pair and read no block table (`ops.sparse.flex_with` passes
        the whole one there)."""
        from torch.nn.attention.flex_attention import BlockMask

        device = torch.device(device)

        def make():  # on a miss only: a mask_mod's constants are device tensors, made by a copy that waits for the GPU
            bm, tables = self._block_mask(tq, tk, causal, device, block_size)
            inside = self.partial_mask_mod(tq, tk, causal, device, block_size, tables=tables)
            return bm, bm if inside is None else BlockMask.from_kv_blocks(
                bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, BLOCK_SIZE=block_size,
                mask_mod=inside, seq_lengths=(tq, tk))
        return self.cached(("pair", tq, tk, causal, str(device), block_size), make)

    def cached(self, key: tuple, make):
        """make(), kept under `key` for this data version (the pattern's BlockMasks and kernel tables): the 16 most
        recently used, dropped when the data changes (`touch`) or the pattern moves (`.to()`)."""
        key = (self.version_key(), *key)
        hit = self._block_masks.get(key)
        if hit is not None:
            self._block_masks.move_to_end(key)
            return hit
        value = self._block_masks[key] = make()
        while len(self._block_masks) > 16:
            self._block_masks.popitem(last=False)
        return value

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() move the buffers: cached BlockMasks go with the old ones
        self._block_masks.clear()
        return super()._apply(fn, *args, **kwargs)


class UnionPattern(Pattern):
    """Pairs allowed by any of the parts (attention-gym's or_masks, with each part's data kept as its own module).
    Its key chunks follow the first part's chunking, each chunk's keys being the union of what every part
    reaches from the chunk's query rows."""

    def __init__(self, *parts: Pattern):
        super().__init__()
        self.parts = torch.nn.ModuleList(parts)

    @property
    def per_head(self) -> bool:
        return any(p.per_head for p in self.parts)

    @property
    def shift_invariant(self) -> bool:
        return all(p.shift_invariant for p in self.parts)

    @property
    def num_heads(self) -> int:
        return next(p.num_heads for p in self.parts if p.per_head)

    def version_key(self) -> tuple:
        return (id(self), self._touched, *(p.version_key() for p in self.parts))

    def touch(self) -> None:
        super().touch()
        for p in self.parts:
            p.touch()

    def covers(self, tq, tk):
        return next((why for why in (p.covers(tq, tk) for p in self.parts) if why), None)

    def block_tables(self, nb, bs, causal):
        tables = [p.block_tables(nb, bs, causal) for p in self.parts]
        if any(t is None for t in tables):
            return None
        any_, full = tables[0]
        for a, f in tables[1:]:
            any_, full = any_ | a, full | f
        return any_, full

    def blockwise(self, tq, tk, block_size):
        return all(p.blockwise(tq, tk, block_size) for p in self.parts)

    def covers_diagonal_block(self, block_size):
        return any(p.covers_diagonal_block(block_size) for p in self.parts)

    def partial_mask_mod(self, tq, tk, causal, device, block_size, tables=False):
        """Causal, with Tk - Tq a whole number of blocks (so the diagonal cuts only blocks whose pairs lie
        0 <= pos(i) - j < block_size apart): in a partial block of the union no part is full, so a `blockwise` part
        (an aligned block layout) is there either empty or cut by the diagonal, and on the diagonal a part that
        `covers_diagonal_block` (learned_mask's local band, global_sparse's band) already admits every causal pair.
        The union there is the other parts' mask_mods with causal, and the layout's table is never read (the whole
        mask_mod gathers from it on every pair of a partial block). A ragged last block is partial even where the
        layout keeps it whole unless the BlockMask came from block tables (`tables`): then the whole mask_mod. A
        blockwise part nested in another union is still read (correct, no saving)."""
        if not causal or self.blockwise(tq, tk, block_size):
            return super().partial_mask_mod(tq, tk, causal, device, block_size, tables)
        rest = [p for p in self.parts if not p.blockwise(tq, tk, block_size)]
        if (len(rest) == len(self.parts) or not any(p.covers_diagonal_block(block_size) for p in rest)
                or (tk - tq) % block_size or ((tq % block_size or tk % block_size) and not tables)):
            return None
        return and_masks(or_masks(*(p.mask_mod(tq, tk, False, device) for p in rest)), causal_mod(tk - tq, device))

    def mask_mod(self, tq, tk, causal=False, device=None):
        mods = [p.mask_mod(tq, tk, False, device) for p in self.parts]
        mod = or_masks(*mods)
        return and_masks(mod, causal_mod(tk - tq, device if device is not None else self.device)) if causal else mod

    def key_chunks(self, tq, tk, causal):
        first, *rest = self.parts
        for s, e, kidx in first.key_chunks(tq, tk, causal):
            extra = [k for p in rest for s2, e2, k in p.key_chunks(tq, tk, causal) if s2 < e and e2 > s]
            yield s, e, torch.unique(torch.cat([kidx.to(self.device), *(k.to(self.device) for k in extra)]))
