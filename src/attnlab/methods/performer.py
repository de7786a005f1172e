"""Performer / FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers", arXiv:2009.14794).

Positive orthogonal random features estimate the softmax kernel without bias:

    exp(q.k * scale) = E_w[phi(q') phi(k')],  q' = q sqrt(scale), k' = k sqrt(scale),
    phi(x) = exp(W x - |x|^2 / 2) / sqrt(m),  W [m, D]: orthogonal blocks (QR) with chi(D) row norms,

then `_linear_core` runs the kernelised attention (O(T m D); causal by chunked prefix sums).

Stabilisation: exp() overflows for large projections, so maxima are subtracted in the exponent:
- queries: a per-query-row max (a factor c_i on row i multiplies numerator and denominator alike);
- keys: a per-key max b_j = max_f (w_f.k'_j - |k'_j|^2/2), so phi(k_j) = exp(b_j) * [a bounded vector]. The
  per-key factor exp(b_j) does NOT cancel, so it is handed to `_linear_core` as the key log-scale, which
  stabilises it with maxima that do cancel: in causal mode a running max over the keys each query can see.
  (ONE max over all keys, as before, let a later key with a large b underflow the earlier keys' features:
  a causal leak, up to O(1) changes of earlier outputs for a key aligned with a large-norm feature.)
  Padded keys get weight exactly 0.
Both maxima are detached: exp(b_j) exp(a_jf - b_j) does not depend on b_j, so its gradient is zero.
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


def orthogonal_gaussian(m: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """[m, d]: stacked blocks of d orthonormal rows, each row rescaled to a chi(d) norm (so rows are
    marginally N(0, I) but orthogonal within a block: lower-variance estimator than iid rows)."""
    g = torch.randn(-(-m // d), d, d, generator=gen, dtype=torch.float64)  # (blocks, d, d)
    qmat, r = torch.linalg.qr(g)  # one batched QR: orthonormal columns per block
    # Fix QR's sign convention (diag(R) > 0): without it Q is not Haar-distributed and the rows have
    # a nonzero mean, which biases the estimator (measured: the error stopped falling with m).
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    w = qmat.transpose(-1, -2).reshape(-1, d)[:m]  # (m, d): the rows of each block
    norms = torch.randn(m, d, generator=gen, dtype=torch.float64).norm(dim=1, keepdim=True)  # chi(d)
    return (w * norms).float()


@register("performer")
class Performer(AttentionMethod):
    """FAVOR+ softmax-kernel estimator; unbiased, error falls like 1/sqrt(num_features)."""

    capabilities = Capabilities(causal=True, padding=True, attn_mask=False, probs=True)

    @dataclasses.dataclass
    class Options:
        num_features: int = opt(256, "random features m (the estimator's error falls like 1/sqrt(m))")
        redraw: bool = opt(False, "draw fresh features at every forward in training mode")
        seed: int = opt(0, "seed of the feature draw (same seed => same features)")
        chunk_size: int = opt(256, "tokens per chunk of the causal chunked form (same result for any value; 256: fastest measured on an H100 at 64k)")

        def __post_init__(self):
            for name in ("num_features", "chunk_size"):
                check_int("performer", name, getattr(self, name), 1)

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        # One generator for the module's life: redraws continue the seeded stream (reproducible runs).
        self._gen = torch.Generator().manual_seed(self.opts.seed)
        self.register_buffer("features", orthogonal_gaussian(self.opts.num_features, head_dim, self._gen))  # (m, D)

    def redraw_features(self) -> None:
        w = orthogonal_gaussian(self.opts.num_features, self.head_dim, self._gen)
        # Rebind (not copy_ in place): a graph from the previous forward may still need the old tensor.
        self.features = w.to(device=self.features.device, dtype=self.features.dtype)

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        if self.training and self.opts.redraw:
            self.redraw_features()
        w = self.features.float() * math.sqrt(scale)  # (m, D): sqrt(scale) folded into the features
        log_inv = -0.5 * math.log(self.opts.num_features)
        phi_q, _ = favor_features(q, w, scale / 2, log_inv)  # (B, H, Tq, m); the per-row max cancels row-wise
        phi_k, k_log = favor_features(k, w, scale / 2, log_inv)  # (B, H, Tk, m), (B, H, Tk): true one exp(k_log) x
        kw = dict(causal=causal, key_padding_mask=key_padding_mask, key_log_scale=k_log)
        if need_probs:
            return linear_attention_quadratic(phi_q, phi_k, v, **kw)
        return linear_attention(phi_q, phi_k, v, chunk_size=self.opts.chunk_size, **kw), None


@fused
def favor_features(x: torch.Tensor, w: torch.Tensor, half_scale: float, log_inv: float):
    """FAVOR+ positive features of x [B, H, T, D] with w = sqrt(scale) * W [m, D] (fp32):

        log phi(x) = x.w - scale |x|^2 / 2 - b(x) + log_inv,  b(x) = max over the m features (detached)

    Returns (phi in x's dtype, b in fp32 [B, H, T]): the true feature is exp(b) phi. The exponent is
    computed in fp32 (bf16 rounding of x.w, |x.w| ~ 10-20, would move every feature by several percent);
    compiled on CUDA into one matmul and one fused kernel."""
    xf = x.to(_compute_dtype(x.dtype))  # fp32 for half inputs
    lx = xf @ w.to(xf.dtype).T - xf.pow(2).sum(-1, keepdim=True) * half_scale  # (B, H, T, m)
    b = lx.detach().amax(-1, keepdim=True)  # (B, H, T, 1)
    return torch.exp(lx - b + log_inv).to(x.dtype), b.squeeze(-1)
