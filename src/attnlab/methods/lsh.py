"""Reformer LSH attention (Kitaev, Kaiser & Levskaya, "Reformer: The Efficient Transformer", ICLR 2020).

Each hash round r (of `n_hashes`):

1. Hash every token with angular LSH: h(x) = argmax([x R_r ; -x R_r]) for a random rotation
   R_r [D, n_buckets/2] (paper section 2, after Andoni et al. 2015). Only x's direction matters.
2. Sort the tokens by (bucket, position) and cut the sorted sequence into chunks of `bucket_size`.
3. Each query chunk attends to its own key chunk and the previous one ("look one back"), masked so a
   query sees only keys of its own bucket (plus causal and key padding, both on ORIGINAL positions).
4. Keep the chunk softmax's log-sum-exp per query, unsort.

The rounds are combined with their log-sum-exps: out_i = sum_r softmax_r(lse_r,i) * out_r,i, which is
the softmax over the union of the rounds' key sets (a key found in k rounds is counted k times, as in
trax / reformer-pytorch's default; the paper's optional duplicate-count correction is not applied).

Memory per round is O(T * bucket_size): the T x T matrix is built only when `need_probs=True`.

shared_qk=True (the paper's definition, default)
    Keys are the queries normalised, k_j = q_j / |q_j|, and THE `k` ARGUMENT IS IGNORED (it is only
    shape-checked). Values are `v`. Because q_i . k_i is then the largest score a query can have, a
    token attends to itself only when no other key is allowed: its self score is set to the finite
    -1e5 (paper section 2, "Causal masking for shared-QK attention"), never -inf, so a row whose only
    allowed key is itself still has an answer. A padded or causally hidden self key stays hidden.

shared_qk=False (an approximation BEYOND the paper, for dropping LSH into a pretrained model that has
    real keys): q and k are hashed with the same rotations, sorted separately by (bucket, position) and
    chunked; query chunk c attends to key chunks c and c-1, masked to the same bucket (+ causal,
    padding). There is no self special case. Queries and keys of one bucket need not line up in the
    two sorted orders, so recall depends on how balanced the buckets of q and k are, and a query whose
    window holds no key of its bucket gets an output of zeros (as a fully masked row does).

Exact limit: bucket_size >= T gives one bucket and one chunk, i.e. dense attention (shared-QK dense
attention with the -1e5 diagonal when shared_qk=True). Tq must equal Tk (self-attention only).

Causality: no query ever gives weight to a key at a later position (the mask is on original
positions; `need_probs` is exactly 0 above the diagonal). But an output at position i is NOT a
function of tokens <= i alone once there are several buckets: a later token's bucket decides where it
sorts, which can shift chunk boundaries and so change which EARLIER keys fall in an earlier query's
window. This is inherent to Reformer's chunking (it does not leak future content into the weighted
sum, it changes the candidate set). Perturbing only future values, or future queries/keys in ways that
keep their buckets, leaves earlier outputs bit-identical.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from ..registry import register
from ..ops.fused import compile_unavailable_reason, fused, triton_importable
from ..types import Capabilities, opt
from .base import AttentionMethod

SELF_SCORE = -1e5  # Reformer's value for a token attending to itself (finite, so it can be the last resort)


@register("lsh")
class LSH(AttentionMethod):
    """Reformer LSH attention: hash, sort, chunk, attend within bucket (look one back), combine rounds."""
    complexity = ("O(r n (log n + c d))", "O(r n c)", "r: n_hashes, c: bucket_size")

    capabilities = Capabilities(causal=True, padding=True, attn_mask=False, probs=True, cross=False)

    @dataclasses.dataclass
    class Options:
        bucket_size: int = opt(64, "tokens per chunk of the sorted sequence; n_buckets ~ T / bucket_size", low=1)
        n_hashes: int = opt(2, "hash rounds, combined by their log-sum-exps (more rounds: better recall)", low=1)
        seed: int = opt(0, "seed of the random rotations (same seed: same buckets; per layer from the swap seed)")
        shared_qk: bool = opt(
            True, "Reformer's shared-QK: keys = q/|q| and the k argument is IGNORED; False hashes the real k"
        )
        backend: str = opt("auto", "auto (triton on CUDA in bf16 / fp16 for buckets of up to 128 tokens, else compiled on "
                                   "CUDA, eager elsewhere) | triton (ops/lsh_triton.py: sort's gathers fused into the chunk "
                                   "attention) | compiled (the PyTorch form's chunk softmax through torch.compile) | "
                                   "eager", choices=("auto", "triton", "compiled", "eager"))

    @classmethod
    def defaults(cls, seq_len):
        return {"bucket_size": max(16, min(64, seq_len // 8)), "n_hashes": 2, "shared_qk": False}

    @classmethod
    def exact_limit(cls, tq, tk):
        return {"bucket_size": 2 * max(tq, tk), "shared_qk": False}

    @classmethod
    def test_options(cls, seq_len):
        # one bucket: with several, Reformer's chunking lets a later token's bucket shift which EARLIER keys share
        # a chunk with an earlier query (see the module doc), so a leak check would see changes at <= t
        return {"bucket_size": 2 * seq_len, "shared_qk": False}

    def _unsupported_reasons(self, *, causal, tq, tk, dtype, device, need_probs=False, **extras):
        if self.opts.backend == "compiled" and device is not None and compile_unavailable_reason(device):
            return [f"backend='compiled': {compile_unavailable_reason(device)}"]
        if self.opts.backend == "triton":
            if not triton_importable():
                return ["backend='triton' needs triton, which is not installed"]
            return lsh_triton_reasons(device, chunk=min(self.opts.bucket_size, tk), head_dim=self.head_dim, dtype=dtype,
                                      need_probs=need_probs)
        return []

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        # Rotations depend on n_buckets, which depends on T: drawn on demand from the seed and cached
        # (not a buffer: they are a pure function of (seed, n_buckets, head_dim), nothing to save).
        self._rotations: dict[tuple, torch.Tensor] = {}

    # ---- hashing -------------------------------------------------------------------------------------
    hash_slice_elements = 1 << 26  # the largest projection block _hash builds at once (256 MiB in fp32)

    def n_buckets(self, t: int) -> int:
        """ceil(T / bucket_size), rounded up to even (angular LSH makes buckets in +/- pairs)."""
        n = max(1, math.ceil(t / self.opts.bucket_size))
        return n + (n % 2) if n > 1 else 1

    def rotations(self, n_buckets: int, device, dtype) -> torch.Tensor:
        """R [D, n_hashes, n_buckets / 2], deterministic in (seed, n_buckets)."""
        key = (n_buckets, str(device), dtype)
        if key not in self._rotations:
            g = torch.Generator().manual_seed(self.opts.seed)
            r = torch.randn(self.head_dim, self.opts.n_hashes, n_buckets // 2, generator=g, dtype=torch.float64)
            self._rotations[key] = r.to(device=device, dtype=dtype)
        return self._rotations[key]

    def _hash(self, x: torch.Tensor, n_buckets: int, tp: int) -> torch.Tensor:
        """x (B, H, T, D) -> buckets (B, H, R, Tp), Tp >= T; the internal padding positions T.. get bucket n_buckets
        (sort last). The projections run in fp32 (x's slices cast there; fp64 stays fp64)."""
        b, h, t_real, _ = x.shape
        ct = torch.promote_types(x.dtype, torch.float32)
        if n_buckets == 1:
            buckets = torch.zeros(b, h, self.opts.n_hashes, tp, dtype=torch.long, device=x.device)
        else:
            buckets = torch.empty(b, h, self.opts.n_hashes, tp, dtype=torch.long, device=x.device)
            rotations = self.rotations(n_buckets, x.device, ct)
            half = n_buckets // 2
            # argmax over [rot, -rot] without building it: the larger of max(rot) and -min(rot) (rot wins a tie, as
            # the first index does in argmax), over slices of positions so that the (.., positions, nb/2)
            # projections never exceed ~2^26 elements (at 64k tokens whole, they were 4 GiB, 8 GiB with the concat)
            step = max(1, self.hash_slice_elements // max(1, b * h * self.opts.n_hashes * half))
            with torch.no_grad():  # argmax has no gradient; keep hashing out of the graph
                for s0 in range(0, t_real, step):
                    s1 = min(s0 + step, t_real)
                    rot = torch.einsum("bhtd,dre->bhrte", x[:, :, s0:s1].to(ct), rotations)  # (B, H, R, step, nb/2)
                    hi, arg_hi = rot.max(dim=-1)
                    lo, arg_lo = rot.min(dim=-1)
                    buckets[..., s0:s1] = torch.where(hi >= -lo, arg_hi, arg_lo + half)
        buckets[..., t_real:] = n_buckets
        return buckets

    def flops(self, tq, tk, causal, *, grad=False):
        """Hashing (the rotations: T x D x n_buckets/2 per round, for q, and k unless shared) and, per round,
        softmax attention of each chunk of L = min(bucket_size, T) queries over its own and the previous chunk."""
        o, d, t = self.opts, self.head_dim, tk
        nb = self.n_buckets(t)
        hashed = (1 if o.shared_qk else 2) * 2.0 * t * d * (nb // 2) * o.n_hashes if nb > 1 else 0.0
        chunk = min(o.bucket_size, t)
        width = chunk * (2 if math.ceil(t / chunk) > 1 else 1)
        return hashed + 4.0 * o.n_hashes * t * width * d

    # ---- attention -----------------------------------------------------------------------------------
    def _kernel(self, q, need_probs: bool) -> str:
        """triton (`ops.lsh_triton`) | chunked+compiled | chunked (the PyTorch form, eager)."""
        o = self.opts
        if o.backend == "triton":
            return "triton"
        if o.backend == "auto" and q.is_cuda:
            chunk = min(o.bucket_size, q.shape[-2])
            if triton_importable() and q.dtype in (torch.bfloat16, torch.float16) and not lsh_triton_reasons(
                    q.device, chunk=chunk, head_dim=q.shape[-1], dtype=q.dtype, need_probs=need_probs):
                return "triton"  # measured in bf16 (benchmarks/results/bench_h200/lsh/); fp32 stays compiled
            if compile_unavailable_reason(q.device) is None:
                return "chunked+compiled"
        return "chunked+compiled" if o.backend == "compiled" else "chunked"

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        o = self.opts
        b, h, t, d = q.shape
        r = o.n_hashes
        # Matmuls in bf16 (as `dense`: scores and probabilities rounded to it, fp32 softmax); fp16 computes in
        # fp32 (-1e5 does not fit it). Hashing, log-sum-exps and the combination of rounds run in fp32.
        ct = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        mm = torch.bfloat16 if q.dtype == torch.bfloat16 else ct
        n_buckets = self.n_buckets(t)
        chunk = min(o.bucket_size, t)  # one bucket  <=>  one chunk of length T (no internal padding)
        n_chunks = math.ceil(t / chunk)
        tp = n_chunks * chunk  # T padded up to whole chunks
        device = q.device

        self.kernel = self._kernel(q, need_probs)
        pos = torch.arange(tp, device=device)
        real = torch.zeros(b, tp, dtype=torch.bool, device=device)  # keys that may be attended to
        real[:, :t] = True if key_padding_mask is None else key_padding_mask
        # Hash and sort by (bucket, position): the key bucket * Tp + pos is unique, so argsort is stable.
        if self.kernel == "triton" and n_buckets > 1 and key_padding_mask is None:  # the hash and its sort key in
            from ..ops.lsh_triton import hash_sort                                   # one kernel (ops.lsh_triton)

            rot = self.rotations(n_buckets, device, torch.float32)
            q_order, q_sbkt = hash_sort(q, rot, n_buckets, tp)
            k_order, k_sbkt = (q_order, q_sbkt) if o.shared_qk else hash_sort(k, rot, n_buckets, tp)
        else:
            q_bkt = self._hash(q, n_buckets, tp)  # (B, H, R, Tp)
            k_bkt = q_bkt if o.shared_qk else self._hash(k, n_buckets, tp)
            # padded positions sort after every real one (keeping their bucket): what they hold never moves a real
            # query or key into another chunk (with one bucket, one chunk: the order is moot)
            last = 0 if key_padding_mask is None else (~real).long()[:, None, None, :] * (n_buckets + 1)

            def sort(bkt):
                order = ((bkt + last) * tp + pos).argsort(dim=-1)  # (B, H, R, Tp): sorted slot -> original position
                return order, bkt.gather(-1, order)

            q_order, q_sbkt = sort(q_bkt)
            k_order, k_sbkt = (q_order, q_sbkt) if o.shared_qk else sort(k_bkt)

        if self.kernel == "triton":  # ops.lsh_triton: the gathers, the window and the unsort in one kernel
            from ..ops.lsh_triton import lsh_chunk_attention

            kk = F.normalize(q.to(ct), dim=-1).to(q.dtype) if o.shared_qk else k
            if key_padding_mask is not None:  # padded keys: bucket -1, never a query's
                k_real = real[:, None, None, :].expand(b, h, r, tp).gather(-1, k_order)
                k_sbkt = k_sbkt.masked_fill(~k_real, -1)
            out = lsh_chunk_attention(q, kk, v, q_order, q_sbkt, k_order, k_sbkt, scale=scale, causal=causal,
                                      shared=o.shared_qk, chunk=chunk)
            return out.to(v.dtype), None

        qf, vf = q.to(ct), v.to(ct)
        kf = F.normalize(qf, dim=-1) if o.shared_qk else k.to(ct)  # shared-QK: k_j = q_j / |q_j|
        if tp > t:
            qf, kf, vf = (F.pad(x, (0, 0, 0, tp - t)) for x in (qf, kf, vf))  # (B, H, Tp, D)

        def gather(x, order):  # (B, H, Tp, D) -> (B, H, R, n_chunks, chunk, D) in sorted order
            x = x.unsqueeze(2).expand(b, h, r, tp, x.shape[-1])
            return x.gather(3, order.unsqueeze(-1).expand(b, h, r, tp, x.shape[-1])).view(b, h, r, n_chunks, chunk, -1)

        def chunked(x):  # (B, H, R, Tp) -> (B, H, R, n_chunks, chunk)
            return x.view(b, h, r, n_chunks, chunk)

        sq = gather(qf.to(mm), q_order)  # (B, H, R, C, L, D)
        sk, sv = gather(kf.to(mm), k_order), gather(vf.to(mm), k_order)
        q_pos, q_sbkt = chunked(q_order), chunked(q_sbkt)  # (B, H, R, C, L)
        k_pos, k_sbkt = chunked(k_order), chunked(k_sbkt)
        k_real = chunked(real[:, None, None, :].expand(b, h, r, tp).gather(-1, k_order))

        if n_chunks > 1:
            # Look one back: key window of chunk c = chunk c ++ chunk c-1 (W = 2L). Chunk 0 has no
            # predecessor (no wrap-around to the last chunk): its look-back half is marked invalid.
            def back(x):
                return torch.cat([x, x.roll(1, dims=3)], dim=4)

            sk, sv, k_pos, k_sbkt = back(sk), back(sv), back(k_pos), back(k_sbkt)  # (B,H,R,C,W[,D])
            has_prev = (torch.arange(n_chunks, device=device) > 0)[:, None]  # (C, 1)
            k_real = torch.cat([k_real, k_real.roll(1, dims=3) & has_prev], dim=4)

        masks_kw = dict(q_pos=q_pos, k_pos=k_pos, q_sbkt=q_sbkt, k_sbkt=k_sbkt, k_real=k_real)
        compiled = self.kernel == "chunked+compiled"
        out_s, lse, has = _chunk_attention(sq, sk, sv, scale, causal, o.shared_qk, compiled=compiled, **masks_kw)
        out_s = out_s.reshape(b, h, r, tp, d)  # sorted order, fp32
        lse_s = lse.masked_fill(~has, float("-inf")).reshape(b, h, r, tp)

        # Unsort each round, then combine the rounds weighted by softmax over their log-sum-exps.
        undo = q_order.argsort(dim=-1)  # (B, H, R, Tp): original position -> sorted slot
        out_r = out_s.gather(3, undo.unsqueeze(-1).expand(b, h, r, tp, d))  # (B, H, R, Tp, D)
        lse_r = lse_s.gather(-1, undo)  # (B, H, R, Tp)
        any_key = (lse_r > float("-inf")).any(dim=2, keepdim=True)  # (B, H, 1, Tp)
        w = torch.softmax(lse_r.masked_fill(~any_key, 0.0), dim=2)  # (B, H, R, Tp); finite even for empty rows
        out = (w.unsqueeze(-1) * out_r).sum(dim=2) * any_key.squeeze(2).unsqueeze(-1).to(ct)  # (B, H, Tp, D)
        out = out[:, :, :t].to(v.dtype)

        probs = None
        if need_probs:
            # Implied matrix: P[i, j] = sum_r w_r,i * p_r,ij, scattered from the chunks (T x T only here).
            w_s = chunked(w.gather(-1, q_order))  # (B, H, R, C, L): round weights in sorted order
            scores, allowed, _ = _chunk_scores(sq, sk, scale, causal, o.shared_qk, **masks_kw)
            p = torch.exp(scores - lse.unsqueeze(-1))  # (B, H, R, C, L, W)
            contrib = p.masked_fill(~allowed, 0.0) * w_s.unsqueeze(-1)  # (B, H, R, C, L, W)
            idx = q_pos.unsqueeze(-1) * tp + k_pos.unsqueeze(-2)  # flat (query, key) in original positions
            probs = torch.zeros(b, h, tp * tp, dtype=ct, device=device)
            probs = probs.scatter_add(-1, idx.reshape(b, h, -1), contrib.reshape(b, h, -1))
            probs = probs.view(b, h, tp, tp)[:, :, :t, :t]
        return out, probs


def lsh_triton_reasons(device, **kw) -> list[str]:
    from ..ops import lsh_triton  # imports triton: only when asked

    return lsh_triton.unsupported_reasons(device, **kw)


def _chunk_scores(sq, sk, scale, causal, shared_qk, *, q_pos, k_pos, q_sbkt, k_sbkt, k_real):
    """Masked chunk scores [B, H, R, C, L, W] in fp32 (fp64 for fp64), the allowed mask and whether each query has a key."""
    acc = torch.promote_types(sq.dtype, torch.float32)  # fp32 (fp64 for fp64 inputs)
    scores = torch.matmul(sq, sk.transpose(-1, -2)).to(acc) * scale  # (B, H, R, C, L, W)
    allowed = (q_sbkt.unsqueeze(-1) == k_sbkt.unsqueeze(-2)) & k_real.unsqueeze(-2)  # same bucket, real key
    if causal:
        allowed = allowed & (k_pos.unsqueeze(-2) <= q_pos.unsqueeze(-1))  # by ORIGINAL positions
    if shared_qk:
        # Self last: applied before the -inf fill, so a padded self key stays invisible.
        scores = scores.masked_fill(k_pos.unsqueeze(-2) == q_pos.unsqueeze(-1), SELF_SCORE)
    scores = scores.masked_fill(~allowed, float("-inf"))
    has = allowed.any(dim=-1)  # (B, H, R, C, L): the query has a key in this round
    # Rows with nothing allowed get dummy finite scores so neither forward nor backward sees -inf - -inf.
    return scores.masked_fill(~has.unsqueeze(-1), 0.0), allowed, has


@fused
def _chunk_attention(sq, sk, sv, scale, causal, shared_qk, **masks_kw):
    """Softmax attention inside each chunk window: (out [B, H, R, C, L, D] in fp32 at least, lse [B, H, R, C, L], has).
    One fused kernel chain on CUDA (the masks, log-sum-exp and exp never round-trip through memory)."""
    scores, _, has = _chunk_scores(sq, sk, scale, causal, shared_qk, **masks_kw)
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, R, C, L)
    p = torch.exp(scores - lse.unsqueeze(-1))  # (B, H, R, C, L, W)
    return torch.matmul(p.to(sv.dtype), sv).to(p.dtype), lse, has
