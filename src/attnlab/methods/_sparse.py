"""The shared shape of sparse-pattern methods: a `Pattern` (patterns/) computed by `ops.sparse`.

A subclass builds `self.pattern` in __init__ and declares `flex_block_size` (FlexAttention's BLOCK_SIZE,
`flex_block_for`: the pattern's own block when it is a multiple of 128 or 64, else 128 with the pattern resolved
inside blocks by its mask_mod). window, block_sparse and the learned / data-informed masks
of distillation and token reduction are this class."""
from __future__ import annotations

from ..ops import sparse as sparse_ops
from ..types import Capabilities
from .base import AttentionMethod

BACKENDS = sparse_ops.BACKENDS
flex_block_for = sparse_ops.flex_block_for
SPARSE_CAPS = Capabilities(causal=True, padding=True, attn_mask=False, probs=True, extras=("lse", "col_sums"))


class SparseAttention(AttentionMethod):
    capabilities = SPARSE_CAPS
    flex_block_size = 128
    native_gqa = True  # k, v reach sparse_attention with their own heads: flex and triton read them so, the rest expand

    def _unsupported_reasons(self, *, causal, tq, tk, dtype, device, need_lse=False, need_col_sums=False,
                             need_probs=False):
        why = [] if need_probs else sparse_ops.unsupported_reasons(
            self.opts.backend, device, need_lse=need_lse, need_col_sums=need_col_sums, pattern=self.pattern,
            head_dim=self.head_dim, dtype=dtype, tq=tq, tk=tk, heads=self.num_heads)
        if tq is not None and tk is not None:
            cover = self.pattern.covers(tq, tk)
            if cover:
                why.append(cover)
        return why

    def anchored(self):
        return not self.pattern.shift_invariant

    def flops(self, tq, tk, causal, *, grad=False):
        pairs = self.pattern.visible_pairs(tq, tk, causal)
        return None if pairs is None else 4.0 * pairs * self.head_dim

    def _check_state(self):
        return self.pattern.version_key()

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs, need_lse=False,
                need_col_sums=False):
        res, self.kernel = sparse_ops.sparse_attention(
            q, k, v, self.pattern, causal=causal, key_padding_mask=key_padding_mask, scale=scale,
            backend=self.opts.backend, need_probs=need_probs, need_lse=need_lse, need_col_sums=need_col_sums,
            flex_block_size=self.flex_block_size,
        )
        return res
