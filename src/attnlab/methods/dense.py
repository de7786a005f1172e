"""Dense softmax attention: softmax(Q K^T * scale + mask) V with an fp32 softmax. The reference."""
from __future__ import annotations

import dataclasses

import torch

from .. import masks
from ..registry import register
from ..types import Capabilities
from .base import AttentionMethod


def dense_attention(q, k, v, *, causal=False, key_padding_mask=None, attn_mask=None, scale=None):
    """Reference attention on already-expanded heads. Returns (out, probs); probs are fp32 (or fp64)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    allowed, bias = masks.combine(
        q.shape[-2], k.shape[-2], causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
        device=q.device,
    )
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Tq, Tk), in the input dtype
    probs = masks.masked_softmax(scores, allowed, bias)  # fp32 (fp64 for fp64 inputs)
    out = torch.matmul(probs.to(v.dtype), v)  # (B, H, Tq, D)
    return out, probs


@register("dense")
class Dense(AttentionMethod):
    """Explicit softmax(QK^T*scale + mask)V, fp32 softmax, can return probs. The reference for every test."""

    capabilities = Capabilities(causal=True, padding=True, attn_mask=True, probs=True)

    @dataclasses.dataclass
    class Options:
        pass

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        out, probs = dense_attention(
            q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, scale=scale
        )
        return out, (probs if need_probs else None)
