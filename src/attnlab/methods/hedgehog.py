"""Hedgehog (Zhang et al. 2024, "The Hedgehog & the Porcupine: Expressive Linear Attentions with Softmax
Mimicry", arXiv:2402.04347): linear attention whose feature map is learned to mimic softmax.

    phi(x) = [softmax(x W_h), softmax(-x W_h)]   (over the F features, per head h; W identity-initialised)

Queries and keys have their own maps (`fm_q`, `fm_k`: feature_maps.Hedgehog), trained by distillation
(`attnlab distill`); `ops.linear` runs the attention (O(T F D); causal by chunked prefix sums or the Triton
kernels). Untrained, the identity init already gives a positive, bounded map (F' = 2F features).
"""
from __future__ import annotations

import dataclasses

from .. import feature_maps
from ..registry import register
from ..types import Capabilities, opt
from ._kernel import BACKENDS, KernelAttention


@register("hedgehog")
class HedgehogAttention(KernelAttention):
    """Linear attention with Hedgehog's learnable softmax-mimicking feature map (trainable)."""
    complexity = ("O(n m d)", "O(n m + m d)", "m: feature_dim")

    capabilities = Capabilities(causal=True, padding=True, probs=True, trainable=True, extras=("col_sums",))

    @dataclasses.dataclass
    class Options:
        feature_dim: int = opt(64, "F: learned features per half (the map has 2F: softmax(xW), softmax(-xW))", low=1)
        chunk_size: int = opt(128, "tokens per chunk of the causal chunked form (same result for any value)", low=1)
        backend: str = opt("auto", "auto | triton | compiled | eager (methods/_kernel.py)", choices=BACKENDS)

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        f = self.opts.feature_dim
        self.fm_q = feature_maps.Hedgehog(num_heads, head_dim, f)
        self.fm_k = feature_maps.Hedgehog(num_heads, head_dim, f)

    @classmethod
    def defaults(cls, seq_len):
        return {"feature_dim": 64}

    @classmethod
    def test_options(cls, seq_len):
        return {"feature_dim": 8, "chunk_size": 8}
