"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv:2006.16236).

    out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j),   phi = elu(x) + 1  (or relu)

O(T F D) instead of O(T^2 D); causal runs the chunked prefix-sum form of `_linear_core`.

`scale` is ignored, as in the paper: phi is applied to q and k directly. The softmax temperature has no
counterpart here: with relu features any positive factor on q or k cancels exactly in the normalisation
(relu is positively homogeneous), and for elu+1 folding sqrt(scale) into q, k would just be another,
non-standard feature map. The argument is accepted only so the method fits the common interface.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from ..registry import register
from ..types import Capabilities, check_choice, check_int, opt
from ..fused import fused
from ._linear_core import _compute_dtype, linear_attention, linear_attention_quadratic
from .base import AttentionMethod

_FEATURE_MAPS = ("elu", "relu")


@register("linear")
class Linear(AttentionMethod):
    """Kernelised attention with a fixed positive feature map; never builds Tq x Tk unless need_probs."""

    # relu features can make a row's normaliser exactly 0 (all q, k features off): that row returns zeros.
    capabilities = Capabilities(causal=True, padding=True, attn_mask=False, probs=True)

    @dataclasses.dataclass
    class Options:
        feature_map: str = opt("elu", "elu (elu(x)+1, the paper's) | relu")
        chunk_size: int = opt(128, "tokens per chunk of the causal chunked form (same result for any value; 128: fastest measured on an H100 at 64k)")

        def __post_init__(self):
            check_choice("linear", "feature_map", self.feature_map, _FEATURE_MAPS)
            check_int("linear", "chunk_size", self.chunk_size, 1)

    def feature(self, x: torch.Tensor) -> torch.Tensor:
        """phi(x) in x's dtype (computed in fp32 for half inputs; one fused kernel on CUDA)."""
        return _elu_plus_one(x) if self.opts.feature_map == "elu" else F.relu(x)

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        phi_q, phi_k = self.feature(q), self.feature(k)  # (B, H, Tq, D), (B, H, Tk, D): F = D
        if need_probs:
            return linear_attention_quadratic(phi_q, phi_k, v, causal=causal, key_padding_mask=key_padding_mask)
        out = linear_attention(
            phi_q, phi_k, v, causal=causal, key_padding_mask=key_padding_mask, chunk_size=self.opts.chunk_size
        )
        return out, None


@fused
def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    xf = x.to(_compute_dtype(x.dtype))  # fp32 for half inputs
    return (F.elu(xf) + 1.0).to(x.dtype)
