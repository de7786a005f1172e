"""Sequence-resizing attention: n input rows in, m = ceil(ratio * n) output rows out.

The research this project follows adds a scaling matrix W_S (m x n) to the query path of scaled dot-product
attention, Q' = W_S Q, so that

    out = softmax(Q' K^T * scale) V          # [m, d]: every output row reads all n keys

With ratio < 1 it shortens a sequence (an encoder, a learned pooling layer); with ratio > 1 it lengthens one
(the decoder of the autoencoder in attnlab.compress). Which rows of Q an output row mixes is W_S's business:

- mixing="absolute" (the paper's): W_S is a learned [ceil(ratio * max_len), max_len] matrix. A shorter input
  uses it resampled to [m, n] by area averaging (adaptive average pooling), scaled by max_len / n so that each
  row keeps its mass: at n == max_len it is exactly the paper's matrix, and one trained matrix serves every
  length up to max_len.
- mixing="relative": W_S[i, j] = g(c_i - j), a learned kernel g over the offset (in input rows, linearly
  interpolated between integer offsets, zero beyond `radius`) between input row j and the input position c_i =
  (i + 0.5) n / m - 0.5 that output row i is centred on. Translation-invariant: it serves any length, with
  2 * radius + 1 numbers per head.

bias="distance" (not in the paper; attnlab's addition, which is what lets the autoencoder learn on real text)
adds -softplus(a_h) * |c_i + o_h - j| to the scores: each head starts reading the rows around its own offset o_h
in the stretch of output row i (offsets spread evenly over the stretch), with a learned slope and offset per
head. Without it a row's attention is content-based from the start and training sits on the unigram plateau
(measured: held-out token accuracy 4% after 1500 steps at ratio 1/2, 512 tokens).

init="pool" starts every output row as a triangular average of the input rows around its centre (half-width
max(1, n / m)); init="identity" (ratio 1 only) makes W_S the identity: exactly dense attention, the method's
exact limit. The output length of one call may be set with `out_len=` (the decoder needs exactly the original
length): `method(q, k, v, out_len=512)`. key_padding_mask hides padded keys as in every method; q's rows
enter the mixing as they are (it is linear: zero the padded rows of q, as attnlab.compress does, and they add
nothing). Non-causal only: an output row mixes the queries of a whole stretch of the input.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import register
from ..types import Capabilities, OptionError, ShapeError, opt
from .base import AttentionMethod
from .sdpa import sdpa_allowed

_MIXINGS = ("relative", "absolute")
_INITS = ("pool", "identity", "normal")


def out_length(n: int, ratio: float) -> int:
    """Output rows for n input rows at `ratio` (at least 1). The 1e-9 keeps ratio = 1/3 of 513 at 171."""
    return max(1, math.ceil(n * ratio - 1e-9))


def centres(m: int, n: int, device=None) -> torch.Tensor:
    """Float[m]: the input position (in rows, 0 .. n-1) each of m output rows is centred on."""
    return (torch.arange(m, device=device, dtype=torch.float64) + 0.5) * (n / m) - 0.5


def triangle(offset: torch.Tensor, half_width: float) -> torch.Tensor:
    """The pooling kernel: max(0, 1 - |offset| / w) / w, mass 1 over integer offsets when w is an integer."""
    return (1 - offset.abs() / half_width).clamp_min(0) / half_width


@register("reduce")
class Reduce(AttentionMethod):
    """Attention whose output has ceil(ratio * n) rows: Q' = W_S Q (paper) or a relative-offset kernel."""
    complexity = ("O(m n d)", "O(m n)", "m: out_len = ratio n")

    capabilities = Capabilities(causal=False, padding=True, probs=True, trainable=True, max_len=True, resizes=True)

    @dataclasses.dataclass
    class Options:
        ratio: float = opt(0.5, "output rows per input row: 0.5 halves the sequence, 2.0 doubles it", low=1e-3, high=64.0)
        mixing: str = opt("relative", "relative: a learned kernel over row offsets (any length) | absolute: the "
                          "paper's learned [m, max_len] W_S, area-resampled for shorter inputs", choices=_MIXINGS)
        max_len: int = opt(512, "n: the longest input (absolute: W_S's width)", low=1)
        radius: int = opt(8, "relative: the kernel reaches this many input rows either side of a row's centre", low=0)
        per_head: bool = opt(True, "one mixing per head (heads can then read different rows of a stretch)")
        init: str = opt("pool", "pool: triangular average of the rows around each centre | identity: exact "
                        "attention (ratio 1) | normal: N(0, 1/n) (absolute) or N(0, 1/(2 radius + 1)) (relative)",
                        choices=_INITS)
        bias: str = opt("none", "none: the paper's scores | distance: a learned per-head penalty on the distance "
                        "from the row's centre plus a per-head offset (rows start local)", choices=("none", "distance"))
        seed: int = opt(0, "seed of the normal init")

        def __post_init__(self):
            if self.init == "identity" and self.ratio != 1:
                raise OptionError(f"reduce: init='identity' needs ratio=1, got ratio={self.ratio}")
            if (self.mixing == "relative" and self.init == "pool" and self.ratio > 0
                    and self.radius + 1 < max(1.0, 1 / self.ratio)):
                raise OptionError(f"reduce: radius={self.radius} is narrower than the stretch each output row covers "
                                  f"at ratio {self.ratio} ({1 / self.ratio:.3g} rows); use radius >= "
                                  f"{math.ceil(max(1.0, 1 / self.ratio)) - 1}")

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        o = self.opts
        self.max_len = o.max_len
        heads = (num_heads,) if o.per_head else ()
        half = max(1.0, 1 / o.ratio)
        gen = torch.Generator().manual_seed(o.seed)
        if o.mixing == "relative":
            offsets = torch.arange(-o.radius, o.radius + 1, dtype=torch.float64)
            if o.init == "identity":
                base = (offsets == 0).double()
            elif o.init == "pool":
                base = triangle(offsets, half)
            else:
                base = torch.randn(offsets.shape, generator=gen, dtype=torch.float64) / math.sqrt(len(offsets))
            self.kernel_weights = nn.Parameter(base.float().expand(*heads, -1).clone())
            self.W = None
        else:
            m, n = out_length(o.max_len, o.ratio), o.max_len
            if o.init == "identity":
                base = torch.eye(n, dtype=torch.float64)
            elif o.init == "pool":
                base = triangle(centres(m, n)[:, None] - torch.arange(n, dtype=torch.float64)[None, :], half)
            else:
                base = torch.randn(m, n, generator=gen, dtype=torch.float64) / math.sqrt(n)
            self.W = nn.Parameter(base.float().expand(*heads, -1, -1).clone())
            self.kernel_weights = None
        self._out_len: int | None = None
        self.slope = self.offset = None
        if o.bias == "distance":
            stretch = 1 / o.ratio
            # slope 1 per row where each head owns about one row of the stretch, gentler where it owns several
            slope = min(1.0, num_heads / stretch)
            self.slope = nn.Parameter(torch.full((num_heads,), math.log(math.expm1(slope))))  # softplus^-1
            spread = max(stretch, 1.0)
            self.offset = nn.Parameter(((torch.arange(num_heads) + 0.5) / num_heads - 0.5) * (spread if num_heads > 1 else 0))

    # ---- what the method owns ------------------------------------------------------------------------------
    @classmethod
    def defaults(cls, seq_len):
        return {"max_len": max(seq_len, 1)}

    @classmethod
    def exact_limit(cls, tq, tk):
        return {"ratio": 1.0, "init": "identity", "max_len": max(tq, tk), "radius": 0}

    @classmethod
    def test_options(cls, seq_len):
        return {"max_len": seq_len, "ratio": 0.5, "radius": 3, "bias": "distance"}

    def output_length(self, n: int, out_len: int | None = None) -> int:
        """Rows this method returns for n input rows (out_len, when given, wins)."""
        return out_len if out_len is not None else out_length(n, self.opts.ratio)

    def _check_state(self):
        return (self._out_len, None if self.W is None else tuple(self.W.shape))

    def _unsupported_reasons(self, *, causal, tq, tk, dtype, device, **_):
        why = []
        if tq is not None and tq > self.opts.max_len:
            why.append(f"it was built for at most max_len={self.opts.max_len} input rows, got {tq}")
        m = self._out_len
        if m is not None and self.W is not None and m > self.W.shape[-2]:
            why.append(f"its absolute W_S has {self.W.shape[-2]} rows; out_len={m} needs mixing='relative' or a "
                       f"larger ratio * max_len")
        return why

    # ---- the contract, plus out_len ------------------------------------------------------------------------
    def forward(self, q, k, v, *, out_len: int | None = None, **kw):
        if out_len is not None and (isinstance(out_len, bool) or not isinstance(out_len, int) or out_len < 1):
            raise ShapeError(f"reduce: out_len must be an int >= 1, got {out_len!r}")
        self._out_len = out_len
        try:
            return super().forward(q, k, v, **kw)
        finally:
            self._out_len = None

    def mixing_matrix(self, m: int, n: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """W_S for n input rows and m output rows: [m, n], or [H, m, n] per head."""
        if self.W is not None:
            w = self.W
            if w.shape[-2:] != (m, n):
                lead = w.shape[:-2]
                w = F.adaptive_avg_pool2d(w.reshape(-1, 1, *w.shape[-2:]), (m, n)).reshape(*lead, m, n)
                w = w * (self.opts.max_len / n)
            return w.to(device=device, dtype=dtype)
        g = self.kernel_weights  # [(H,) 2R + 1]
        r = self.opts.radius
        delta = centres(m, n, device)[:, None] - torch.arange(n, device=device, dtype=torch.float64)[None, :]
        pos = (delta + r).clamp(-1, 2 * r + 1)  # index into g, fractional; outside [0, 2R]: weight 0
        lo = pos.floor()
        frac = (pos - lo).to(g.dtype)
        lo = lo.long()
        padded = F.pad(g, (1, 1))  # g[-1] = g[2R + 1] = 0
        w = padded[..., lo + 1] * (1 - frac) + padded[..., (lo + 2).clamp_max(2 * r + 2)] * frac
        return w.to(dtype)

    def distance_bias(self, m: int, n: int, tk: int, device) -> torch.Tensor | None:
        """Float[H, m, Tk]: -softplus(slope_h) * |c_i + offset_h - j| (None without bias="distance")."""
        if self.slope is None:
            return None
        c = centres(m, n, device).float()  # keys are the same rows as the mixed queries (self-attention)
        delta = c[None, :, None] + self.offset[:, None, None] - torch.arange(tk, device=device, dtype=torch.float32)
        return -F.softplus(self.slope)[:, None, None] * delta.abs()

    def flops(self, tq, tk, causal, *, grad=False):
        return None  # not counted yet: bench rows carry only the dense-equivalent count for this method

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        n = q.shape[-2]
        m = self.output_length(n, self._out_len)
        w = self.mixing_matrix(m, n, device=q.device, dtype=q.dtype)  # [m, n] or [H, m, n]
        qm = torch.matmul(w, q)  # [B, H, m, D]
        allowed = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        bias = self.distance_bias(m, n, k.shape[-2], q.device)
        if need_probs:
            self.kernel = "reference"
            ct = torch.promote_types(q.dtype, torch.float32)  # fp32 at least, fp64 stays fp64
            scores = torch.matmul(qm.to(ct), k.to(ct).transpose(-1, -2)) * scale
            if bias is not None:
                scores = scores + bias
            if allowed is not None:
                scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
            return torch.matmul(probs, v.to(ct)).to(q.dtype), probs
        self.kernel = "sdpa"
        return sdpa_allowed(qm, k, v, allowed, scale=scale, bias=bias), None
