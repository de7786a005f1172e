"""The size limits every attnlab Triton kernel shares: 32-bit offsets within one (batch, head) row.

The kernels form each row's base from 64-bit program ids (batch x head never overflows), but a token index times a
token stride, and a chunk index times a state's size, are 32-bit integers (Triton types an int argument below 2^31
as int32, and its vector index arithmetic follows). Past 2^31 elements within one row they wrap: reads and writes
land outside the tensor (an illegal address on the GPU, a crash under the interpreter, or silently wrong rows).
In transformers' layout ([B, T, H, D] memory seen as [B, H, T, D]) a row spans T x H x D elements: 524,288 tokens
of 32 heads of 128 reach it.

`span_reasons` is the shape-level check the methods' dispatch runs before any compute (backend='triton' is refused
with it, backend='auto' takes another kernel); `check_rows` is the entry points' check of the tensors they are
handed, for layouts wider than transformers' (a slice of a fused qkv projection)."""
from __future__ import annotations

import torch

from ..types import UnsupportedError

OFFSET_LIMIT = 2**31  # the first offset int32 cannot hold; the tests lower it to exercise both checks


def row_span(x: torch.Tensor, lead: int = 2) -> int:
    """One past the largest offset within one row of x: its dims after the first `lead` (batch, head), in
    elements, as its strides place them (0 for an empty tensor)."""
    if x.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(x.shape[lead:], x.stride()[lead:]))


def span_reasons(t: int | None, *, heads: int, head_dim: int, feature_dim: int = 0, fallback: str = "torch") -> list[str]:
    """Why the kernels' 32-bit row offsets cannot index a call of t tokens (empty: they can), counting the widest
    row they touch: q, k, v and the output in transformers' layout (T x H x D), a contiguous feature map (T x F),
    and a chunked form's per-chunk states (T / 64 x F x D)."""
    if t is None:
        return []
    per_token = max(heads * head_dim, feature_dim, -(-feature_dim * head_dim // 64))
    span = t * per_token
    if span < OFFSET_LIMIT:
        return []
    return [f"backend='triton' indexes each head's rows with 32-bit offsets: {t} tokens x {per_token} elements a "
            f"token = {span:,} >= 2^31 (use backend='{fallback}', or split the input)"]


def check_rows(op: str, *xs: torch.Tensor | None, lead: int = 2) -> None:
    """Raise UnsupportedError where one row of any of xs spans 2^31 elements or more (see the module doc)."""
    for x in xs:
        if x is not None and row_span(x, lead) >= OFFSET_LIMIT:
            raise UnsupportedError(
                f"{op}: a tensor of shape {tuple(x.shape)} and strides {x.stride()} spans {row_span(x, lead):,} "
                "elements within one (batch, head) row, past the Triton kernels' 32-bit offsets (2^31); pass it "
                "contiguous, split the input, or use a non-Triton backend")


def check_call(op: str, t: int, *xs: torch.Tensor | None, heads: int, head_dim: int, feature_dim: int = 0) -> None:
    """An entry point's check before any launch: the rows it allocates (`span_reasons`) and the tensors it is handed
    (`check_rows`) fit 32-bit offsets, else one UnsupportedError naming `op`."""
    why = span_reasons(t, heads=heads, head_dim=head_dim, feature_dim=feature_dim)
    if why:
        raise UnsupportedError(f"{op}: {why[0]}")
    check_rows(op, *xs)
