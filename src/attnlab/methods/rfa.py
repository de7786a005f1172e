"""Random Feature Attention (Peng et al. 2021, "Random Feature Attention", arXiv:2103.02143).

Random Fourier (trigonometric) features of the Gaussian kernel (feature_maps.Fourier: feature dimension 2m),
with the key factor exp(|k'|^2/2) handed to `ops.linear` as the key log-scale (stabilised causally, as for
performer): an unbiased estimate of softmax(q.k * scale), the exact limit as m grows.

`normalize=True` is how the paper's code runs RFA (feature_maps.UnitFourier): queries and keys l2-normalised,
the kernel's sharpness a learned per-head, per-dimension sigma (init `sigma`); the estimate is then of softmax
over cosine similarities at temperature 1 / sigma^2, not of the model's own softmax, so it is for training
(from scratch, or distillation), not for a swap without training. Use it there: with the plain map a ViT
trained on Fashion-MNIST stayed at chance (its normaliser, scaled by the unbounded exp(|k'|^2/2), blew up).

Caveat: trig features are not positive, so the estimated normaliser sum_j phi(q_i).phi(k_j) can be near zero
or negative for small m or large-norm inputs, and the output then blows up. Rows with no visible key have a
normaliser of exactly 0 and return zeros.
"""
from __future__ import annotations

import dataclasses

from .. import feature_maps
from ..registry import register
from ..types import Capabilities, opt
from ._kernel import RandomFeatureAttention, RandomFeatureOptions


@register("rfa")
class RFA(RandomFeatureAttention):
    """Random Fourier feature estimate of softmax attention; unbiased kernel, error ~ 1/sqrt(m)."""
    complexity = ("O(n m d)", "O(n m + m d)", "m: num_features")

    capabilities = Capabilities(causal=True, padding=True, attn_mask=False, probs=True, trainable=True)  # learn_features
    feature_map_cls = feature_maps.Fourier

    @dataclasses.dataclass
    class Options(RandomFeatureOptions):
        normalize: bool = opt(False, "l2-normalise queries and keys and learn a per-head, per-dim sigma (the paper's "
                                     "practice; for training: it no longer estimates the model's own softmax)")
        sigma: float = opt(1.0, "with normalize: the initial sigma (kernel exp(sigma^2 q^.k^) for unit q^, k^)",
                           low=1e-6)

    def make_feature_map(self):
        o = self.opts
        if not o.normalize:
            return super().make_feature_map()
        return feature_maps.UnitFourier(self.num_heads, self.head_dim, o.num_features, o.seed, o.redraw,
                                        o.learn_features, o.sigma)
