"""Performer / FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers", arXiv:2009.14794).

Positive orthogonal random features estimate the softmax kernel without bias (feature_maps.FAVOR), then
`ops.linear` runs the kernelised attention (O(T m D); causal by chunked prefix sums). The per-key factor that
does not cancel goes to the core as the key log-scale, which stabilises it with a running max over the keys
each query can see: one max over all keys would let a later large key underflow the earlier keys' features
(a causal leak, measured before the fix: up to O(1) changes of earlier outputs).
"""
from __future__ import annotations

from .. import feature_maps
from ..registry import register
from ..types import Capabilities
from ._kernel import RandomFeatureAttention


@register("performer")
class Performer(RandomFeatureAttention):
    """FAVOR+ softmax-kernel estimator; unbiased, error falls like 1/sqrt(num_features)."""
    complexity = ("O(n m d)", "O(n m + m d)", "m: num_features")

    capabilities = Capabilities(causal=True, padding=True, attn_mask=False, probs=True, trainable=True)  # learn_features
    feature_map_cls = feature_maps.FAVOR
