"""Sparse attention patterns as FlexAttention `mask_mod`s, their cached BlockMasks, and two kernels.

A mask_mod is `fn(b, h, q_idx, kv_idx) -> Bool` (attention-gym style): True = query q_idx may see key
kv_idx. Factories here return mask_mods; `and_masks` / `or_masks` compose them. Pattern parameters are
captured as 0-d tensors, not Python ints, because torch.compile guards on captured ints: an int window
would recompile flex_attention for every window size, a tensor window reuses one kernel.

The same mask_mod serves three consumers, so the pattern has one definition:
- `flex(...)`: compiled `flex_attention` with a cached `BlockMask` (skips empty blocks on CUDA/CPU);
- `gathered_attention(...)`: the plain-PyTorch fallback, which evaluates the mask_mod on broadcast index
  tensors for just the keys a query chunk can reach (a band, or the kept blocks), never a Tq x Tk mask;
- `dense_mask(...)`: the full Bool[Tq, Tk] matrix, for need_probs and tests.

Positions: with Tq != Tk, query i sits at absolute position i + Tk - Tq (bottom-right, as in masks.py),
so a window or a causal limit is measured from there; `offset = Tk - Tq`.
"""
from __future__ import annotations

import collections
import functools
import hashlib
import importlib
import importlib.util
from typing import Callable, Iterable

import torch

from . import masks
from .types import UnsupportedError

MaskMod = Callable[..., torch.Tensor]

# Parsed once; tests monkeypatch it to prove the "flex unavailable" error path.
TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])


def _const(value, device) -> torch.Tensor:
    return torch.tensor(value, device=device)


# ---- mask_mod factories ---------------------------------------------------------------------------------
def causal(offset: int = 0, device=None) -> MaskMod:
    """Key j visible from query i iff j <= i + offset (offset = Tk - Tq: bottom-right alignment)."""
    off = _const(offset, device)

    def causal_mask(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + off

    return causal_mask


def sliding_window(window: int, offset: int = 0, device=None) -> MaskMod:
    """Longformer's local band: |(i + offset) - j| <= window (both sides; AND with `causal` for one)."""
    w, off = _const(window, device), _const(offset, device)

    def sliding_window_mask(b, h, q_idx, kv_idx):
        return (q_idx + off - kv_idx).abs() <= w

    return sliding_window_mask


def attention_sinks(num_sinks: int, device=None) -> MaskMod:
    """StreamingLLM's attention sinks: the first `num_sinks` keys are visible to every query."""
    n = _const(num_sinks, device)

    def sink_mask(b, h, q_idx, kv_idx):
        return kv_idx < n

    return sink_mask


def block_layout(layout: torch.Tensor, block_size: int, device=None) -> MaskMod:
    """BigBird / Sparse-Transformer block pattern: layout[i // block_size, j // block_size] (True = keep)."""
    table = layout.to(device=device, dtype=torch.bool)
    bs = _const(block_size, device)

    def block_layout_mask(b, h, q_idx, kv_idx):
        return table[q_idx // bs, kv_idx // bs]

    return block_layout_mask


def key_padding(key_padding_mask: torch.Tensor) -> MaskMod:
    """Bool[B, Tk] (True = real key) as a mask_mod. Batch-specific: a BlockMask built from it must not be cached."""

    def key_padding_mask_mod(b, h, q_idx, kv_idx):
        return key_padding_mask[b, kv_idx]

    return key_padding_mask_mod


def and_masks(*mods: MaskMod) -> MaskMod:
    from torch.nn.attention.flex_attention import and_masks as _and

    return _and(*mods)


def or_masks(*mods: MaskMod) -> MaskMod:
    from torch.nn.attention.flex_attention import or_masks as _or

    return _or(*mods)


def dense_mask(mask_mod: MaskMod, tq: int, tk: int, device=None) -> torch.Tensor:
    """Bool[Tq, Tk] of a (batch/head independent) mask_mod, by plain broadcasting: no vmap, no compile."""
    zero = torch.zeros((), dtype=torch.long, device=device)
    qi = torch.arange(tq, device=device)[:, None]
    kj = torch.arange(tk, device=device)[None, :]
    return mask_mod(zero, zero, qi, kj).expand(tq, tk)


# ---- FlexAttention: availability, BlockMask cache, compiled kernel -------------------------------------------
@functools.lru_cache(maxsize=None)
def _flex_unavailable_reason(device_type: str, torch_version: tuple) -> str | None:
    return _flex_unavailable_reason_uncached(torch.device(device_type), torch_version)


def flex_unavailable_reason(device) -> str | None:
    """Why FlexAttention cannot run on `device` (None: it can). Cached per device type: it is on the hot path."""
    return _flex_unavailable_reason(torch.device(device).type, TORCH_VERSION)


def _flex_unavailable_reason_uncached(device: torch.device, torch_version: tuple) -> str | None:
    """Why flex_attention cannot run on `device` (None: it can). Checked before any compute."""
    device = torch.device(device)
    need = (2, 6) if device.type == "cpu" else (2, 5)  # CPU flex (inductor C++ template) landed in 2.6
    if torch_version < need:
        return (f"FlexAttention on {device.type} needs torch >= {need[0]}.{need[1]}, found {torch.__version__}; "
                "use backend='torch'")
    try:
        importlib.import_module("torch.nn.attention.flex_attention")
    except ImportError as e:  # pragma: no cover - builds without flex
        return f"torch.nn.attention.flex_attention is not importable ({e}); use backend='torch'"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "FlexAttention on CUDA compiles Triton kernels but triton is not installed; use backend='torch'"
    return None


_BLOCK_MASKS: collections.OrderedDict = collections.OrderedDict()
_BLOCK_MASK_CACHE_SIZE = 64


def block_mask(pattern_key, make_mask_mod: Callable[[torch.device], MaskMod], b: int | None, h: int | None,
               tq: int, tk: int, device, block_size: int = 128):
    """The BlockMask of a pattern, built once per (pattern key, B, H, Tq, Tk, device, block size) and LRU-cached.

    `make_mask_mod(device)` is only called on a miss. B/H are None for batch/head independent patterns (the
    BlockMask then broadcasts); never cache a batch-specific mask_mod under a key that omits its data.
    """
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device(device)
    key = (pattern_key, b, h, tq, tk, str(device), block_size)
    hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        _BLOCK_MASKS.move_to_end(key)
        return hit
    bm = create_block_mask(make_mask_mod(device), b, h, tq, tk, device=device, BLOCK_SIZE=block_size)
    _BLOCK_MASKS[key] = bm
    if len(_BLOCK_MASKS) > _BLOCK_MASK_CACHE_SIZE:
        _BLOCK_MASKS.popitem(last=False)
    return bm


def layout_key(layout: torch.Tensor) -> str:
    """A content hash of a block layout, for cache keys (two equal layouts share a BlockMask)."""
    lay = layout.detach().to("cpu", torch.bool).contiguous()
    return hashlib.sha1(repr(tuple(lay.shape)).encode() + lay.numpy().tobytes()).hexdigest()[:16]


_COMPILED_FLEX: dict = {}


def compiled_flex_attention(device_type: str = "cuda"):
    """flex_attention under torch.compile, compiled once per process and device type (CPU has no eager flex
    kernel; on CUDA eager flex is a slow reference).

    CPU compiles with static shapes: with automatic dynamic shapes, a second pattern in the same process (a
    captured layout table whose size became symbolic) made the CPU C++ flex template fail to build in torch
    2.13 ("cur_kvSplitSize3 was not declared"). CUDA keeps torch's default (dynamic after a shape change), so
    new lengths do not each cost a recompile there.
    """
    fn = _COMPILED_FLEX.get(device_type)
    if fn is None:
        from torch.nn.attention.flex_attention import flex_attention

        fn = torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)
        _COMPILED_FLEX[device_type] = fn
    return fn


BACKENDS = ("auto", "flex", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    """auto -> flex on CUDA (where flex can run there), else torch. Both compute the same pattern exactly, so
    this is a kernel choice, not a change of method; an explicit "flex" that cannot run is an error instead."""
    if backend != "auto":
        return backend
    return "flex" if device.type == "cuda" and flex_unavailable_reason(device) is None else "torch"


def check_flex(method: str, q, k, v) -> None:
    """Raise UnsupportedError before compute if flex cannot serve this call."""
    why = flex_unavailable_reason(q.device)
    if why is None and q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        # The CPU flex template is inference-only (no backward, no logsumexp) in torch 2.6-2.13.
        why = "FlexAttention on CPU is inference-only (no backward); use backend='torch' to train on CPU"
    if why:
        raise UnsupportedError(f"method {method!r} cannot run backend='flex': {why}")


def flex(q, k, v, block_mask, *, scale: float, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Compiled flex_attention; rows with no visible key return zeros, never NaN.

    Padding reaches the kernel as a score_mod (score -> -inf at padded keys) so the BlockMask stays
    batch-independent and cached; the price is that padded tail blocks are computed, not skipped.
    """
    score_mod = None
    if key_padding_mask is not None:
        real = key_padding_mask

        def key_padding_score(score, b, h, q_idx, kv_idx):
            return torch.where(real[b, kv_idx], score, -float("inf"))

        score_mod = key_padding_score
    # A row whose scores are all -inf comes back as exact zeros from the kernel itself (CPU and CUDA; checked by
    # tests/test_sparse.py on CPU and benchmarks/gpu_checks.py on CUDA), so no logsumexp fix-up pass is needed.
    return compiled_flex_attention(q.device.type)(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)


# ---- the plain-PyTorch fallback ---------------------------------------------------------------------------------
def gathered_attention(q, k, v, mask_mod: MaskMod, chunks: Iterable[tuple[int, int, torch.Tensor]], *, scale: float,
                       key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention where each query chunk [s, e) sees only the keys `kidx` (LongTensor) it lists, masked exactly
    by `mask_mod` evaluated on those (query, key) index pairs. Memory O(chunk x len(kidx)) per step, so a band
    of width w costs O(T * w), not O(T^2). Numerics follow dense: scores in the input dtype, fp32 softmax.
    """
    b, h, tq, d = q.shape
    zero = torch.zeros((), dtype=torch.long, device=q.device)
    outs = []
    for s, e, kidx in chunks:
        qc = q[:, :, s:e]  # (B, H, C, D)
        if kidx.numel() == 0:  # nothing reachable: zeros, as for any fully masked row
            outs.append(torch.zeros_like(qc))
            continue
        kc, vc = k.index_select(2, kidx), v.index_select(2, kidx)  # (B, H, K, D)
        qi = torch.arange(s, e, device=q.device)[:, None]
        allowed = mask_mod(zero, zero, qi, kidx[None, :])[None, None]  # (1, 1, C, K)
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask.index_select(1, kidx)[:, None, None, :]  # (B, 1, C, K)
        scores = torch.matmul(qc, kc.transpose(-1, -2)) * scale  # (B, H, C, K)
        probs = masks.masked_softmax(scores, allowed)
        outs.append(torch.matmul(probs.to(v.dtype), vc))
    return torch.cat(outs, dim=2)


def band_chunks(tq: int, tk: int, *, window: int, sinks: int, causal: bool, device, chunk: int | None = None):
    """Query chunks with the keys a sliding window (+ sinks) can reach: the band [s+off-w, e-1+off+w] and the
    sinks before it. Chunks are at least 64 queries so the Python loop stays short for small windows."""
    off = tk - tq
    chunk = chunk or max(window, 64)
    for s in range(0, tq, chunk):
        e = min(s + chunk, tq)
        lo = max(0, s + off - window)
        hi = min(tk, e - 1 + off + (0 if causal else window) + 1)
        band = torch.arange(lo, max(lo, hi), device=device)
        sink = torch.arange(min(sinks, lo, tk), device=device)
        yield s, e, torch.cat([sink, band])


def layout_chunks(layout: torch.Tensor, tq: int, tk: int, block_size: int, *, causal: bool, device):
    """One chunk per query block: the key indices of its kept key blocks (causal: future blocks dropped)."""
    off = tk - tq
    keep = layout.to("cpu", torch.bool)
    for qb in range((tq + block_size - 1) // block_size):
        s, e = qb * block_size, min((qb + 1) * block_size, tq)
        kbs = keep[qb].nonzero().flatten().tolist()
        if causal:
            kbs = [kb for kb in kbs if kb * block_size <= e - 1 + off]
        idx = [torch.arange(kb * block_size, min((kb + 1) * block_size, tk)) for kb in kbs if kb * block_size < tk]
        kidx = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
        yield s, e, kidx.to(device)
