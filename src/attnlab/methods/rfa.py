"""Random Feature Attention (Peng et al. 2021, "Random Feature Attention", arXiv:2103.02143).

Random Fourier (trigonometric) features of the Gaussian kernel (feature_maps.Fourier: feature dimension 2m),
with the key factor exp(|k'|^2/2) handed to `ops.linear` as the key log-scale (stabilised causally, as for
performer).

Caveat: trig features are not positive, so the estimated normaliser sum_j phi(q_i).phi(k_j) can be near zero
or negative for small m or large-norm inputs, and the output then blows up. Rows with no visible key have a
normaliser of exactly 0 and return zeros.
"""
from __future__ import annotations

from .. import feature_maps
from ..registry import register
from ..types import Capabilities
from ._kernel import RandomFeatureAttention


@register("rfa")
class RFA(RandomFeatureAttention):
    """Random Fourier feature estimate of softmax attention; unbiased kernel, error ~ 1/sqrt(m)."""
    complexity = ("O(n m d)", "O(n m + m d)", "m: num_features")

    capabilities = Capabilities(causal=True, padding=True, attn_mask=False, probs=True, trainable=True)  # learn_features
    feature_map_cls = feature_maps.Fourier
