"""The size limits every attnlab Triton kernel shares: 32-bit offsets within one (batch, head) row, and CUDA's
65,535 programs along a grid's second and third dims, where the kernels put batch x heads.

The kernels form each row's base from 64-bit program ids (batch x head never overflows), but within a row a token
index times a token stride (q, k, v, the outputs and their gradients in the caller's layout) and a token index times
F (a contiguous feature map) are 32-bit integers (Triton types an int argument below 2^31 as int32, and its vector
index arithmetic follows). Past 2^31 elements within one row they wrap: reads and writes land outside the tensor (an
illegal address on the GPU, a crash under the interpreter, or silently wrong rows). In transformers' layout ([B, T, H,
D] memory seen as [B, H, T, D]) a row spans T x H x D elements: 524,288 tokens of 32 heads of 128 reach it. (The
chunked states and the LSH and nystrom kernels index from 64-bit rows or positions: no limit of this kind.)

`span_reasons` is the shape-level check the methods run before any compute (backend='triton' is refused with it,
backend='auto' takes another kernel); `rows_fit` the test of the tensors themselves (auto takes another kernel for a
layout wider than transformers', a slice of a fused qkv projection); `call_reasons` both, which the entry points
refuse in one line (`check_call`) and the one-node FAVOR+ path declines; `narrowed` the backwards' contiguous copy of
a gradient that arrives wider."""
from __future__ import annotations

import torch

from ..types import UnsupportedError

OFFSET_LIMIT = 2**31  # the first offset int32 cannot hold; the tests lower it to exercise the checks


def row_span(x: torch.Tensor, lead: int = 2) -> int:
    """One past the largest offset within one row of x: its dims after the first `lead` (batch, head), in
    elements, as its strides place them (0 for an empty tensor)."""
    if x.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(x.shape[lead:], x.stride()[lead:]))


def span_reasons(*lengths: int | None, heads: int, head_dim: int, feature_dim: int = 0,
                 fallback: str | None = None) -> list[str]:
    """Why the kernels' 32-bit row offsets cannot index a call of the longest of `lengths` tokens (Tq, Tk; None: not
    known; empty: they can), counting the widest row they touch: q, k, v and the output in transformers' layout (T x
    H x D) and a contiguous feature map (T x F). fallback: the backend the message names (None: any other)."""
    t = None  # the longest known length (a loop: this runs every call of a layer)
    for n in lengths:
        if n is not None and (t is None or n > t):
            t = n
    if t is None:
        return []
    per_token = max(heads * head_dim, feature_dim)
    span = t * per_token
    if span < OFFSET_LIMIT:
        return []
    instead = f"backend='{fallback}'" if fallback else "a non-Triton backend"
    return [f"the Triton kernels index each head's rows with 32-bit offsets: {t} tokens x {per_token} elements a "
            f"token = {span:,} >= 2^31 (use {instead}, or split the input)"]


def rows_fit(*xs: torch.Tensor | None, lead: int = 2) -> bool:
    """Whether one row of each of xs spans fewer than 2^31 elements. A storage of fewer bytes holds no such row: that
    test first (0.1 us a tensor, the span's sum 1 us; skipped while torch.compile traces, where it breaks the graph)."""
    tracing = torch.compiler.is_compiling()
    for x in xs:
        if x is None:
            continue
        if not tracing and x.untyped_storage().nbytes() < OFFSET_LIMIT:
            continue
        if row_span(x, lead) >= OFFSET_LIMIT:
            return False
    return True


def call_reasons(t: int, *xs: torch.Tensor | None, heads: int, head_dim: int, feature_dim: int = 0) -> list[str]:
    """Why a kernel call of t tokens cannot be indexed (empty: it can): the rows it allocates (`span_reasons`) and
    the first of the tensors it is handed whose own rows do not fit (`rows_fit`)."""
    why = span_reasons(t, heads=heads, head_dim=head_dim, feature_dim=feature_dim)
    if not rows_fit(*xs):
        x = next(x for x in xs if x is not None and not rows_fit(x))
        why.append(f"a tensor of shape {tuple(x.shape)} and strides {x.stride()} spans {row_span(x):,} elements "
                   "within one (batch, head) row, past the Triton kernels' 32-bit offsets (2^31); pass it contiguous, "
                   "split the input, or use a non-Triton backend")
    return why


def map_fits(x: torch.Tensor, num_features: int) -> bool:
    """Whether FAVOR+'s map kernel (`favor_triton`) can map x [..., D] into [..., m] features within 32-bit row
    offsets: a [B, H, T, D] x as its strides place it, and T x m features a row; other ranks are mapped as one row of
    every token (numel / D tokens, each as wide as x's token stride)."""
    if x.dim() == 4:
        return not call_reasons(x.shape[-2], x, heads=1, head_dim=x.shape[-1], feature_dim=num_features)
    width = max(x.shape[-1], x.stride(-2) if x.dim() > 1 else 0)
    return not span_reasons(x.numel() // max(1, x.shape[-1]), heads=1, head_dim=width, feature_dim=num_features)


def narrowed(x: torch.Tensor) -> torch.Tensor:
    """x where its rows fit 32-bit offsets, else a contiguous copy (T x W a row): for a gradient the backwards read in
    the layout it arrives in (the output's gradient through a concatenation can be wider than the output)."""
    return x if rows_fit(x) else x.contiguous()


def check_call(op: str, t: int, *xs: torch.Tensor | None, heads: int, head_dim: int, feature_dim: int = 0) -> None:
    """An entry point's check before any launch (`call_reasons`): one UnsupportedError naming `op`."""
    why = call_reasons(t, *xs, heads=heads, head_dim=head_dim, feature_dim=feature_dim)
    if why:
        raise UnsupportedError(f"{op}: {why[0]}")


# CUDA's limit on a grid's y and z dims (x takes 2^31 - 1), where the kernels put batch x heads (x LSH's rounds): past
# it the launch fails ("Triton Error [CUDA]: invalid argument"). The tests lower it to exercise the split.
MAX_GRID_ROWS = 65535


def in_batch_pieces(op: str, batch: int, rows_per_item: int, call):
    """None where one launch takes `batch` items of `rows_per_item` grid rows each; otherwise call(lo, hi) for pieces
    of the batch that each fit, their outputs joined along dim 0 (a tuple's items each; None items stay None): batch
    items are independent, so each piece computes its rows as the whole would (autograd records each piece). One
    UnsupportedError where a single item needs more rows than a grid holds."""
    if batch * rows_per_item <= MAX_GRID_ROWS:
        return None
    step = MAX_GRID_ROWS // rows_per_item
    if step == 0:
        raise UnsupportedError(f"{op}: one batch item needs {rows_per_item:,} grid rows (heads x rounds), past CUDA's "
                               f"{MAX_GRID_ROWS:,}; use fewer heads or rounds, or a non-Triton backend")
    outs = [call(lo, min(lo + step, batch)) for lo in range(0, batch, step)]
    if isinstance(outs[0], tuple):
        return tuple(None if parts[0] is None else _joined(parts) for parts in zip(*outs))
    return _joined(outs)


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """parts joined along dim 0 in their own memory order, the batch outermost: a [B, H, T, D] view of [B, T, H, D]
    memory (the kernels' outputs, transformers' next layout) stays one, where torch.cat would make it contiguous."""
    first = parts[0]
    order = sorted(range(first.dim()), key=lambda i: (-first.stride(i), i))  # dims outermost first
    if order[0] != 0 or not all(p.permute(order).is_contiguous() for p in parts):
        return torch.cat(parts, 0)
    return torch.cat([p.permute(order) for p in parts], 0).permute([order.index(i) for i in range(first.dim())])


def piece(x: torch.Tensor | None, lo: int, hi: int) -> torch.Tensor | None:
    """Batch items lo:hi of x for `in_batch_pieces`' call (None stays None; a batch of 1 broadcasts, kept whole)."""
    return x if x is None or x.shape[0] == 1 else x[lo:hi]
