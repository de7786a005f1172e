"""Random Feature Attention (Peng et al. 2021, "Random Feature Attention", arXiv:2103.02143).

Random Fourier (trigonometric) features of the Gaussian kernel (Rahimi & Recht 2007):

    exp(-|x - y|^2 / 2) = E_w[phi(x).phi(y)],  phi(x) = [sin(W x), cos(W x)] / sqrt(m),  W [m, D] ~ N(0, I)

and exp(q'.k') = exp(|q'|^2/2) exp(|k'|^2/2) exp(-|q' - k'|^2/2) with q' = q sqrt(scale), k' = k sqrt(scale).
The q factor is constant along a row and cancels in the normalisation, so it is dropped; the k factor
does not and multiplies phi(k'). It is unbounded (it would overflow exp()), so it goes to `_linear_core` as
the key log-scale |k'|^2/2, which stabilises it with maxima that cancel: in causal mode the running max over
the keys each query can see, never one over all keys (a large later key would underflow the earlier keys'
weights and change earlier outputs: a causal leak). Padded keys get weight exactly 0. Feature dimension: 2m.

Caveat: trig features are not positive, so the estimated normaliser sum_j phi(q_i).phi(k_j) can be
near zero or negative for small m or large-norm inputs, and the output then blows up. Rows with no
visible key have a normaliser of exactly 0 and return zeros (the core does this).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from ..registry import register
from ..types import Capabilities, check_int, opt
from ..fused import fused
from ._linear_core import _compute_dtype, linear_attention, linear_attention_quadratic
from .base import AttentionMethod


@register("rfa")
class RFA(AttentionMethod):
    """Random Fourier feature estimate of softmax attention; unbiased kernel, error ~ 1/sqrt(m)."""

    capabilities = Capabilities(causal=True, padding=True, attn_mask=False, probs=True)

    @dataclasses.dataclass
    class Options:
        num_features: int = opt(256, "random frequencies m (feature dimension 2m: sin and cos)")
        redraw: bool = opt(False, "draw fresh frequencies at every forward in training mode")
        seed: int = opt(0, "seed of the frequency draw (same seed => same features)")
        chunk_size: int = opt(256, "tokens per chunk of the causal chunked form (same result for any value; 256: fastest measured on an H100 at 64k)")

        def __post_init__(self):
            for name in ("num_features", "chunk_size"):
                check_int("rfa", name, getattr(self, name), 1)

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        self._gen = torch.Generator().manual_seed(self.opts.seed)  # redraws continue the seeded stream
        self.register_buffer("features", self._draw())  # (m, D)

    def _draw(self) -> torch.Tensor:
        return torch.randn(self.opts.num_features, self.head_dim, generator=self._gen, dtype=torch.float64).float()

    def redraw_features(self) -> None:
        # Rebind (not copy_ in place): a graph from the previous forward may still need the old tensor.
        self.features = self._draw().to(device=self.features.device, dtype=self.features.dtype)

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        if self.training and self.opts.redraw:
            self.redraw_features()
        w = self.features.float() * math.sqrt(scale)  # (m, D): sqrt(scale) folded into the frequencies
        inv = self.opts.num_features ** -0.5
        phi_q, _ = fourier_features(q, w, scale / 2, inv)  # (B, H, Tq, 2m)
        # (B, H, Tk, 2m) bounded, and lk = scale |k|^2 / 2 [B, H, Tk]: the log of the per-key factor, passed
        # to the core unexponentiated (it applies exp(lk) with causal-safe stabilisers)
        phi_k, lk = fourier_features(k, w, scale / 2, inv)
        kw = dict(causal=causal, key_padding_mask=key_padding_mask, key_log_scale=lk)
        if need_probs:
            return linear_attention_quadratic(phi_q, phi_k, v, **kw)
        return linear_attention(phi_q, phi_k, v, chunk_size=self.opts.chunk_size, **kw), None


@fused
def fourier_features(x: torch.Tensor, w: torch.Tensor, half_scale: float, inv: float):
    """[sin(x.w), cos(x.w)] * inv in x's dtype [B, H, T, 2m], and scale |x|^2 / 2 in fp32 [B, H, T], for
    w = sqrt(scale) * W [m, D]. The phases are computed in fp32; compiled on CUDA into one matmul and one
    fused kernel."""
    xf = x.to(_compute_dtype(x.dtype))  # fp32 for half inputs
    proj = xf @ w.to(xf.dtype).T  # (B, H, T, m)
    phi = torch.cat([proj.sin(), proj.cos()], dim=-1) * inv
    return phi.to(x.dtype), xf.pow(2).sum(-1) * half_scale
