"""Linformer (Wang et al. 2020, "Linformer: Self-Attention with Linear Complexity", arXiv:2006.04768).

Keys and values are projected along the sequence axis by learned E, F of shape [proj_len, max_len]:

    out = softmax(Q (E K)^T * scale) (F V)          # (Tq x proj_len) scores, never Tq x Tk

A shorter input uses the first Tk columns of E/F (the same as zero-padding it to max_len). Padded keys
are zeroed before projecting, and a projected row that reads no real key (E[r, j] == 0 for every real
j) is masked out of the softmax. That makes the identity limit (init="identity", proj_len == max_len)
exactly dense attention, with or without padding and for any Tk <= max_len. Non-causal only: a
projected row mixes future and past keys.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..registry import register
from ..types import Capabilities, OptionError, data_version, opt
from .base import AttentionMethod
from .sdpa import sdpa_allowed

_INITS = ("normal", "identity")


@register("linformer")
class Linformer(AttentionMethod):
    """Low-rank projection of keys/values along the sequence (O(T * proj_len)); trainable E, F."""
    complexity = ("O(n k d)", "O(n k)", "k: proj_len")

    capabilities = Capabilities(causal=False, padding=True, probs=False, trainable=True, max_len=True)

    @dataclasses.dataclass
    class Options:
        proj_len: int = opt(256, "k: number of projected key/value rows (E, F are [proj_len, max_len])", low=1)
        max_len: int = opt(4096, "n: longest key sequence accepted; longer inputs are refused", low=1)
        share_kv: bool = opt(False, "one projection for keys and values (F = E)")
        init: str = opt("normal", "normal: N(0, 1/proj_len) | identity: exact attention, needs proj_len == max_len",
                        choices=_INITS)
        per_head: bool = opt(False, "one E, F per head (default: one pair shared by all heads, as in the paper)")
        seed: int = opt(0, "seed of the random E, F init (per layer from the swap seed)")

        def __post_init__(self):
            if self.init == "identity" and self.proj_len != self.max_len:
                raise OptionError(
                    f"linformer: init='identity' needs proj_len == max_len, got proj_len={self.proj_len}, "
                    f"max_len={self.max_len}; set both to the same value or use init='normal'"
                )

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        o = self.opts
        self.max_len = o.max_len  # the base class refuses longer keys before compute
        # GQA heads are expanded by the base class, so a per-head projection has one slice per query head.
        shape = (num_heads, o.proj_len, o.max_len) if o.per_head else (o.proj_len, o.max_len)
        gen = torch.Generator().manual_seed(o.seed)
        self.E = nn.Parameter(self._init_projection(shape, gen))
        self.F = None if o.share_kv else nn.Parameter(self._init_projection(shape, gen))
        self._unpadded_key, self._unpadded = None, None  # `_unpadded_allowed`'s cache

    @classmethod
    def defaults(cls, seq_len, given=None):
        given = given or {}
        if given.get("init") == "identity":  # the exact limit: proj_len == max_len, whichever is given
            n = given.get("max_len", given.get("proj_len", seq_len))
            return {"max_len": n, "proj_len": n}
        return {"max_len": seq_len, "proj_len": max(8, min(256, seq_len // 4))}

    @classmethod
    def exact_limit(cls, tq, tk):
        return {"max_len": tk, "proj_len": tk, "init": "identity"}

    @classmethod
    def test_options(cls, seq_len):
        return {"max_len": seq_len, "proj_len": max(2, seq_len // 4)}

    def _init_projection(self, shape, gen: torch.Generator) -> torch.Tensor:
        if self.opts.init == "identity":
            return torch.eye(self.opts.max_len).expand(shape).clone()
        return torch.randn(shape, generator=gen) * self.opts.proj_len**-0.5  # variance 1/k: the paper's JL projection

    def flops(self, tq, tk, causal, *, grad=False):
        """E K and F V (proj_len x Tk x D each), then softmax attention of Tq queries over proj_len keys."""
        k = min(self.opts.proj_len, tk) if self.opts.proj_len else tk
        return 4.0 * k * tk * self.head_dim + 4.0 * tq * k * self.head_dim

    def _allowed(self, E, real) -> torch.Tensor:
        """Which projected rows read some real key, Bool[B|1, H|1, 1, P]."""
        reads = torch.einsum("...pt,bt->b...p", (E != 0).to(torch.float32), real)  # (B|1, P) or (B|1, H, P)
        allowed = reads > 0
        return allowed[:, :, None, :] if self.opts.per_head else allowed[:, None, None, :]

    def _unpadded_allowed(self, E, tk: int) -> torch.Tensor | None:
        """Without padding, the rows' mask over the first tk keys, None when every row reads one (always for
        init="normal": no mask, flash). It depends on E's zeros and tk only, so it is computed once per (tk, E's
        storage and version: `types.data_version`, as patterns/base.py keys its BlockMasks) instead of a [P, Tk]
        pass and a host sync every call. Writes through `E.data` bypass the version (see there); an E made under
        torch.inference_mode has none: computed every call."""
        key = (tk, E.dtype, self.E.device, data_version(self.E))
        if self._unpadded_key != key:
            allowed = self._allowed(E, torch.ones(1, tk, device=E.device))
            self._unpadded_key, self._unpadded = key, None if bool(allowed.all()) else allowed
        return self._unpadded

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        self.kernel = "sdpa"
        tk = k.shape[-2]
        E = self.E[..., :tk].to(k.dtype)  # (P, Tk) or (H, P, Tk)
        F = E if self.F is None else self.F[..., :tk].to(v.dtype)  # (P, Tk) or (H, P, Tk)
        # a projected row is a real key only if it reads some real key; otherwise it would add a spurious
        # score-0 key (this is what makes the identity limit exact for Tk < max_len and under padding)
        if key_padding_mask is None:
            allowed = self._unpadded_allowed(E, tk)
        else:
            allowed = self._allowed(E, key_padding_mask.to(torch.float32))
            # zero padded keys/values so the projection sums only real tokens
            k = k.masked_fill(~key_padding_mask[:, None, :, None], 0.0)
            v = v.masked_fill(~key_padding_mask[:, None, :, None], 0.0)
        k_proj = torch.matmul(E, k)  # (B, H, P, D)
        v_proj = torch.matmul(F, v)  # (B, H, P, D)
        # attention over P projected keys: fused SDPA in the inputs' dtype; a row with no real key gives zeros
        return sdpa_allowed(q, k_proj, v_proj, allowed, scale=scale), None
