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
        chunk_size: int = opt(64, "tokens per chunk of the causal chunked prefix-sum form")

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

    def _log_features(self, x: torch.Tensor) -> torch.Tensor:
        w = self.features.to(x.dtype)  # (m, D)
        return x @ w.T - x.pow(2).sum(-1, keepdim=True) / 2  # (B, H, T, m)

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        if self.training and self.opts.redraw:
            self.redraw_features()
        ct = _compute_dtype(q.dtype)
        root = math.sqrt(scale)
        lq = self._log_features(q.to(ct) * root)  # (B, H, Tq, m)
        lk = self._log_features(k.to(ct) * root)  # (B, H, Tk, m)
        q_max = lq.amax(-1, keepdim=True).detach()  # (B, H, Tq, 1): per row, cancels row-wise
        k_log = lk.amax(-1).detach()  # (B, H, Tk): per key; NOT cancelling alone, so it goes to the core
        inv = self.opts.num_features ** -0.5
        phi_q = torch.exp(lq - q_max) * inv  # (B, H, Tq, m)
        phi_k = torch.exp(lk - k_log.unsqueeze(-1)) * inv  # (B, H, Tk, m): <= 1/sqrt(m); true one: exp(k_log) x
        kw = dict(causal=causal, key_padding_mask=key_padding_mask, key_log_scale=k_log)
        if need_probs:
            return linear_attention_quadratic(phi_q, phi_k, v, **kw)
        return linear_attention(phi_q, phi_k, v, chunk_size=self.opts.chunk_size, **kw), None
