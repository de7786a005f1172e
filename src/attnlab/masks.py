"""The three kinds of mask a method receives, and the dense helpers that combine them.

Conventions (the same as torch SDPA):
- `causal`: a flag. With Tq != Tk the diagonal is aligned bottom-right: query i sits at absolute
  position Tk - Tq + i (the decoding convention of flash-attention >= 2.1 and of a KV cache).
- `key_padding_mask`: Bool[B, Tk], True where the key is real.
- `attn_mask`: Bool (True = may attend) or float (added to the scores; -inf = masked), broadcastable
  to [B, H, Tq, Tk].
A row with no visible key returns zeros, never NaN.
"""
from __future__ import annotations

import torch


def causal_allowed(tq: int, tk: int, device=None) -> torch.Tensor:
    """Bool[Tq, Tk]: True where query i may see key j (j <= i + Tk - Tq)."""
    qpos = torch.arange(tq, device=device).unsqueeze(-1) + (tk - tq)
    kpos = torch.arange(tk, device=device).unsqueeze(0)
    return kpos <= qpos


def combine(
    tq: int,
    tk: int,
    *,
    causal: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    attn_mask: torch.Tensor | None = None,
    device=None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Fold all masks into (allowed: Bool[B|1, H|1, Tq, Tk] | None, bias: Float | None).

    `bias` is a float attn_mask to add to the scores (its -inf entries are also folded into `allowed`).
    """
    allowed = None

    def _and(a, b):
        return b if a is None else a & b

    if causal:
        allowed = _and(allowed, causal_allowed(tq, tk, device)[None, None])
    if key_padding_mask is not None:
        allowed = _and(allowed, key_padding_mask[:, None, None, :].bool())
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = _and(allowed, _as4d(attn_mask))
        else:
            bias = _as4d(attn_mask)
            allowed = _and(allowed, bias > float("-inf"))
    return allowed, bias


def _as4d(mask: torch.Tensor) -> torch.Tensor:
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    return mask


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over the last dim in (at least) fp32; rows with nothing allowed give zeros, not NaN."""
    scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.where(allowed.any(dim=-1, keepdim=True), probs, torch.zeros((), dtype=probs.dtype, device=probs.device))


def row_has_key(
    tq: int, tk: int, *, causal: bool, key_padding_mask: torch.Tensor | None, device=None
) -> torch.Tensor | None:
    """Bool[B|1, 1, Tq, 1]: whether a query row has at least one visible key (causal + padding only).

    Cheap (O(B*Tk)); used by methods that never build the Tq x Tk matrix to zero empty rows.
    """
    if key_padding_mask is None:
        if causal and tk < tq:
            qpos = torch.arange(tq, device=device) + (tk - tq)
            return (qpos >= 0)[None, None, :, None]
        return None
    real = key_padding_mask.bool()
    if causal:
        # first real key position per batch; a query sees a key iff its position >= that first key
        big = torch.full_like(real, tk, dtype=torch.long)
        idx = torch.arange(tk, device=real.device).expand_as(real)
        first = torch.where(real, idx, big).min(dim=-1).values  # (B,)
        qpos = torch.arange(tq, device=real.device) + (tk - tq)
        return (qpos[None, :] >= first[:, None])[:, None, :, None]
    return real.any(dim=-1)[:, None, None, None].expand(-1, 1, tq, 1)
