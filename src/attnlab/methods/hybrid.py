"""LoLCATs' hybrid attention (Zhang et al. 2024, "LoLCATs: On Low-Rank Linearizing of Large Language Models",
arXiv:2410.10254): exact softmax over a sliding window, Hedgehog linear attention over the keys beyond it,
one shared normaliser:

    out_i = (sum_{j in W(i)} g e^{s_ij - m_i} v_j + sum_{j not in W(i)} phi(q_i).phi(k_j) v_j)
            / (sum_{j in W(i)} g e^{s_ij - m_i}     + sum_{j not in W(i)} phi(q_i).phi(k_j))

with s_ij = q_i.k_j * scale, W(i) the keys with |pos(i) - j| <= window (and j <= pos(i) when causal), m_i the
max of s over W(i), g = sigmoid(window_factor_h) a learned per-head weight (LoLCATs' init: 0.1), phi the learned
Hedgehog maps. As in LoLCATs the linear terms are not shifted by m_i: both kinds are O(1) (phi(q).phi(k) <= 2).

Computed without a T x T matrix and without cancellation: the keys beyond the window of query i are the keys
j <= pos(i) - window - 1, i.e. a causal linear attention against the key prefix [0, Tk - window - 1) (its
bottom-right offset does the shift; `ops.linear.linear_parts`, chunked prefix sums); non-causal adds the mirror
image (j >= pos(i) + window + 1: the same on the reversed sequence). The band of window keys
(patterns.WindowPattern's key chunks) adds its softmax terms, a query chunk at a time. Exact limit: window >= T
(no key beyond the window: softmax attention; g cancels).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .. import feature_maps, masks
from ..ops.fused import compile_unavailable_reason
from ..ops.linear import linear_parts
from ..patterns import WindowPattern
from ..registry import register
from ..types import AttnOutput, Capabilities, opt
from .base import AttentionMethod


@register("hybrid")
class Hybrid(AttentionMethod):
    """Sliding-window softmax + Hedgehog linear attention beyond the window, one normaliser (trainable)."""
    complexity = ("O(n (w + m) d)", "O(n (w + m) + m d)", "w: window, m: feature_dim")

    capabilities = Capabilities(causal=True, padding=True, probs=True, trainable=True)

    @dataclasses.dataclass
    class Options:
        window: int = opt(64, "keys with |i - j| <= window get exact softmax (causal: j <= i as well)", low=0)
        feature_dim: int = opt(64, "F of the Hedgehog maps for the keys beyond the window (2F features)", low=1)
        window_factor: float = opt(0.1, "initial weight g of the softmax terms (sigmoid of a learned per-head "
                                        "logit; LoLCATs: 0.1)", low=1e-6, high=1 - 1e-6)
        chunk_size: int = opt(128, "tokens per chunk of the linear part's causal form", low=1)
        backend: str = opt("auto", "auto (feature maps compiled on CUDA) | compiled | eager",
                           choices=("auto", "compiled", "eager"))

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        o = self.opts
        self.fm_q = feature_maps.Hedgehog(num_heads, head_dim, o.feature_dim)
        self.fm_k = feature_maps.Hedgehog(num_heads, head_dim, o.feature_dim)
        g = torch.tensor(float(o.window_factor))
        self.window_logit = nn.Parameter(torch.full((num_heads,), float(torch.log(g / (1 - g)))))
        self.pattern = WindowPattern(o.window)

    @classmethod
    def defaults(cls, seq_len):
        return {"window": min(64, max(4, seq_len // 8)), "feature_dim": 64}

    @classmethod
    def exact_limit(cls, tq, tk):
        return {"window": max(tq, tk)}

    @classmethod
    def test_options(cls, seq_len):
        return {"window": max(1, seq_len // 6), "feature_dim": 8, "chunk_size": 8}

    def _unsupported_reasons(self, *, causal, tq, tk, dtype, device, **extras):
        why = []
        if not causal and tq is not None and tk is not None and tq != tk:
            why.append(f"non-causal hybrid attention needs Tq == Tk (got {tq}, {tk})")
        if self.opts.backend == "compiled" and device is not None and compile_unavailable_reason(device):
            why.append(f"backend='compiled': {compile_unavailable_reason(device)}")
        return why

    def _far_parts(self, phi_q, phi_k, v, key_padding_mask):
        """(num [B, H, Tq, D], den [B, H, Tq]) of the linear terms of the keys before the window: the key prefix
        [0, Tk - window - 1) under causal bottom-right alignment, whose offset is exactly the window shift."""
        n_far = phi_k.shape[-2] - self.opts.window - 1
        b, h, tq, d = *phi_q.shape[:3], v.shape[-1]
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        if n_far <= 0:
            return phi_q.new_zeros(b, h, tq, d, dtype=acc), phi_q.new_zeros(b, h, tq, dtype=acc)
        kpm = None if key_padding_mask is None else key_padding_mask[:, :n_far]
        return linear_parts(phi_q, phi_k[:, :, :n_far], v[:, :, :n_far], causal=True, key_padding_mask=kpm,
                            chunk_size=self.opts.chunk_size)

    def flops(self, tq, tk, causal, *, grad=False):
        return None  # not counted yet: bench rows carry only the dense-equivalent count for this method

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        b = self.opts.backend
        compiled = b == "compiled" or (b == "auto" and q.is_cuda and compile_unavailable_reason(q.device) is None)
        phi_q, _ = self.fm_q(q, scale=scale, is_query=True, compiled=compiled)  # (B, H, Tq, 2F)
        phi_k, _ = self.fm_k(k, scale=scale, is_query=False, compiled=compiled)  # (B, H, Tk, 2F)
        gate = torch.sigmoid(self.window_logit.float())[None, :, None, None]  # (1, H, 1, 1)
        tq, tk = q.shape[-2], k.shape[-2]
        if need_probs:
            self.kernel = "quadratic"
            return self._quadratic(q, k, v, phi_q, phi_k, gate, causal, key_padding_mask, scale)
        self.kernel = "window+linear" + ("+compiled" if compiled else "")
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        num_all, den_all = self._far_parts(phi_q, phi_k, v, key_padding_mask)  # (B, H, Tq, D), (B, H, Tq) fp32
        if not causal:  # and the keys after the window: the same on the reversed sequence
            kpm = None if key_padding_mask is None else key_padding_mask.flip(1)
            num_r, den_r = self._far_parts(phi_q.flip(2), phi_k.flip(2), v.flip(2), kpm)
            num_all, den_all = num_all + num_r.flip(2), den_all + den_r.flip(2)
        mod = self.pattern.mask_mod(tq, tk, causal, q.device)
        zero = torch.zeros((), dtype=torch.long, device=q.device)
        outs = []
        for s, e, kidx in self.pattern.key_chunks(tq, tk, causal):
            kidx = kidx.to(q.device)
            num, den = num_all[:, :, s:e], den_all[:, :, s:e]
            if kidx.numel():
                allowed = mod(zero, zero, torch.arange(s, e, device=q.device)[:, None], kidx[None, :])[None, None]
                if key_padding_mask is not None:
                    allowed = allowed & key_padding_mask.index_select(1, kidx)[:, None, None, :]  # (B, 1, C, K)
                kc, vc = k.index_select(2, kidx), v.index_select(2, kidx)  # (B, H, K, D)
                scores = (torch.matmul(q[:, :, s:e], kc.transpose(-1, -2)) * scale).to(acc)  # (B, H, C, K)
                scores = scores.masked_fill(~allowed, float("-inf"))
                m = scores.amax(-1, keepdim=True)
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()  # cancels: no gradient needed
                w = gate.to(acc) * torch.exp(scores - m)  # 0 where not allowed
                num = num + torch.matmul(w.to(v.dtype), vc).to(acc)
                den = den + w.sum(-1)
            zero_den = den == 0
            outs.append(torch.where(zero_den.unsqueeze(-1), torch.zeros_like(num),
                                    num / den.masked_fill(zero_den, 1.0).unsqueeze(-1)))
        return torch.cat(outs, dim=2).to(v.dtype), None

    def _quadratic(self, q, k, v, phi_q, phi_k, gate, causal, key_padding_mask, scale):
        """The same function with the Tq x Tk weight matrix (need_probs, and the reference in the tests)."""
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        tq, tk = q.shape[-2], k.shape[-2]
        visible, _ = masks.combine(tq, tk, causal=causal, key_padding_mask=key_padding_mask, device=q.device)
        visible = torch.ones(1, 1, tq, tk, dtype=torch.bool, device=q.device) if visible is None else visible
        band = self.pattern.dense(tq, tk, False, q.device)[None] & visible  # (B|1, 1, Tq, Tk)
        scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).to(acc).masked_fill(~band, float("-inf"))
        m = scores.amax(-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
        w = gate.to(acc) * torch.exp(scores - m)
        lin = torch.matmul(phi_q, phi_k.transpose(-1, -2)).to(acc)
        w = w + lin.masked_fill(~(visible & ~band), 0.0)
        den = w.sum(-1, keepdim=True)
        probs = torch.where(den == 0, torch.zeros_like(w), w / den.masked_fill(den == 0, 1.0))
        return AttnOutput(torch.matmul(probs.to(v.dtype), v), probs)
