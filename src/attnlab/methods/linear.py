"""Linear attention (Katharopoulos et al. 2020, "Transformers are RNNs", arXiv:2006.16236).

    out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j),   phi = elu(x) + 1  (or relu)

O(T F D) instead of O(T^2 D); causal runs the chunked prefix-sum form of `ops.linear` (or its Triton kernels).

`scale` is ignored, as in the paper: phi is applied to q and k directly. The softmax temperature has no
counterpart here: with relu features any positive factor on q or k cancels exactly in the normalisation
(relu is positively homogeneous), and for elu+1 folding sqrt(scale) into q, k would just be another,
non-standard feature map. The argument is accepted only so the method fits the common interface.
"""
from __future__ import annotations

import dataclasses

from .. import feature_maps
from ..registry import register
from ..types import Capabilities, opt
from ._kernel import BACKENDS, KernelAttention


@register("linear")
class Linear(KernelAttention):
    """Kernelised attention with a fixed positive feature map; never builds Tq x Tk unless need_probs."""
    complexity = ("O(n d²)", "O(n d + d²)", "d: head dim")

    # relu features can make a row's normaliser exactly 0 (all q, k features off): that row returns zeros.
    capabilities = Capabilities(causal=True, padding=True, attn_mask=False, probs=True, extras=("col_sums",))

    @dataclasses.dataclass
    class Options:
        feature_map: str = opt("elu", "elu (elu(x)+1, the paper's) | relu", choices=("elu", "relu"))
        chunk_size: int = opt(128, "tokens per chunk of the causal chunked form (same result for any value; 128: "
                                   "fastest measured on an H100 at 64k)", low=1)
        backend: str = opt("auto", "auto | triton | compiled | eager (methods/_kernel.py)", choices=BACKENDS)

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        self.feature_map = feature_maps.ELU() if self.opts.feature_map == "elu" else feature_maps.ReLU()

    @classmethod
    def test_options(cls, seq_len):
        return {"chunk_size": 8}
