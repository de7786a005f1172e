"""Dense softmax attention: softmax(Q K^T * scale + mask) V with an fp32 softmax. The reference.

Its extras come from the full matrix (lse of the masked scores, column sums of the probabilities), so the
blockwise paths of the other methods are checked against a computation that shares no code with them."""
from __future__ import annotations

import dataclasses

import torch

from .. import masks
from ..registry import register
from ..types import AttnOutput, Capabilities
from .base import AttentionMethod


def dense_attention(q, k, v, *, causal=False, key_padding_mask=None, attn_mask=None, scale=None, need_lse=False):
    """Reference attention on already-expanded heads. Returns (out, probs) or (out, probs, lse); probs are fp32
    (or fp64), lse [B, H, Tq] in the same dtype (-inf for a row with no visible key)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed, bias = masks.combine(
        q.shape[-2], k.shape[-2], causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
        device=q.device,
    )
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk), in the input dtype
    probs = masks.masked_softmax(scores, allowed, bias)  # fp32 (fp64 for fp64 inputs)
    out = torch.matmul(probs.to(v.dtype), v)  # (B, H, Tq, D)
    if not need_lse:
        return out, probs
    s = scores.to(probs.dtype) + (0 if bias is None else bias.to(probs.dtype))
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    return out, probs, torch.logsumexp(s, dim=-1)


def column_sums(probs: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
    """probs [B, H, Tq, Tk] summed over the query rows; with Tq == Tk padded query rows are left out."""
    if key_padding_mask is not None and probs.shape[-2] == probs.shape[-1]:
        probs = probs * key_padding_mask[:, None, :, None].to(probs.dtype)
    return probs.sum(-2)


@register("dense")
class Dense(AttentionMethod):
    """Explicit softmax(QK^T*scale + mask)V, fp32 softmax, can return probs. The reference for every test."""
    complexity = ("O(n² d)", "O(n²)", "explicit score matrix")

    capabilities = Capabilities(causal=True, padding=True, attn_mask=True, probs=True, extras=("lse", "col_sums"))

    @dataclasses.dataclass
    class Options:
        pass

    @classmethod
    def exact_limit(cls, tq, tk):
        return {}

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs, need_lse=False,
                need_col_sums=False):
        self.kernel = "dense"
        out, probs, *lse = dense_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask,
                                           attn_mask=attn_mask, scale=scale, need_lse=need_lse)
        cols = column_sums(probs, key_padding_mask) if need_col_sums else None
        return AttnOutput(out, probs if need_probs else None, lse=lse[0] if lse else None, col_sums=cols)
