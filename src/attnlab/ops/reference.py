"""Softmax attention computed a block of query rows at a time: the output, each row's log-sum-exp and the
attention each key receives (column sums), with memory O(chunk x Tk) instead of O(Tq x Tk).

This is the "math" path of `sdpa` and `dense` for the extras (`need_lse`, `need_col_sums`): the numbers are
dense's (scores in the inputs' dtype, fp32 softmax), only never all rows at once.

Column sums: col_sums[b, h, j] = sum over query rows i of P[b, h, i, j]. With self-attention (Tq == Tk) and a
key padding mask, padded query rows are left out of the sum (they are the same padded tokens); every other
row that sees at least one key contributes exactly 1 in total.
"""
from __future__ import annotations

import torch

from .. import masks


def _rows_allowed(s: int, e: int, tq: int, tk: int, *, causal: bool, key_padding_mask, attn_mask, device):
    """(allowed Bool[B|1, H|1, e-s, Tk] | None, bias Float | None) for query rows [s, e)."""
    allowed = None
    if causal:
        qpos = torch.arange(s, e, device=device)[:, None] + (tk - tq)
        allowed = (torch.arange(tk, device=device)[None, :] <= qpos)[None, None]
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, None, :]
        allowed = kp if allowed is None else allowed & kp
    bias = None
    if attn_mask is not None:
        rows = masks._as4d(attn_mask)
        rows = rows[..., s:e, :] if rows.shape[-2] == tq else rows  # a mask broadcast over queries stays as is
        if rows.dtype == torch.bool:
            allowed = rows if allowed is None else allowed & rows
        else:
            bias = rows
            fin = rows > float("-inf")
            allowed = fin if allowed is None else allowed & fin
    return allowed, bias


def lse_and_probs(scores: torch.Tensor):
    """Masked scores (-inf where not allowed, fp32/fp64) -> (row log-sum-exp, probabilities); a row with no
    allowed key has lse -inf and probabilities 0 (never exp(-inf - -inf))."""
    lse = torch.logsumexp(scores, dim=-1)
    return lse, torch.exp(scores - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).unsqueeze(-1))


def blockwise_attention(q, k, v, *, scale: float, causal: bool = False, key_padding_mask=None, attn_mask=None,
                        need_out: bool = True, need_lse: bool = False, need_col_sums: bool = False,
                        chunk: int | None = None):
    """q [B, H, Tq, D], k/v [B, H, Tk, D] (heads already expanded). Returns (out | None, lse | None, col_sums | None):
    out in v's dtype, lse [B, H, Tq] fp32 (-inf for an empty row), col_sums [B, H, Tk] fp32."""
    b, h, tq, _ = q.shape
    tk = k.shape[-2]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if chunk is None:  # about 16M scores per step
        chunk = max(1, min(tq, (1 << 24) // max(1, b * h * tk)))
    outs, lses = [], []
    cols = torch.zeros(b, h, tk, dtype=acc, device=q.device) if need_col_sums else None
    row_real = key_padding_mask if (need_col_sums and key_padding_mask is not None and tq == tk) else None
    for s in range(0, tq, chunk):
        e = min(s + chunk, tq)
        allowed, bias = _rows_allowed(s, e, tq, tk, causal=causal, key_padding_mask=key_padding_mask,
                                      attn_mask=attn_mask, device=q.device)
        scores = torch.matmul(q[:, :, s:e], k.transpose(-1, -2)) * scale  # (B, H, C, Tk), the inputs' dtype
        scores = scores.to(acc)
        if bias is not None:
            scores = scores + bias.to(acc)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        lse, probs = lse_and_probs(scores)  # (B, H, C), (B, H, C, Tk)
        if need_out:
            outs.append(torch.matmul(probs.to(v.dtype), v))
        if need_lse:
            lses.append(lse)
        if cols is not None:
            if row_real is not None:
                probs = probs * row_real[:, None, s:e, None].to(acc)
            cols += probs.sum(-2)
    out = torch.cat(outs, dim=2) if need_out else None
    return out, (torch.cat(lses, dim=2) if need_lse else None), cols


def block_mass(q, k, *, block_size: int, scale: float, causal: bool, sinks: int = 0):
    """The attention each query block gives each key block, summed over the block's queries: [B, H, nq_blocks,
    nk_blocks] fp32, computed one query block at a time (never a T x T matrix). q [B, H, Tq, D], k [B, H, Tk, D]
    (heads expanded); causal is bottom-right aligned for Tq != Tk. Each query's row sums to 1 (0 if it sees no key).
    With `sinks` > 0, returns (mass, sink_mass [B, H, nq_blocks]): the part of it that goes to the first `sinks` keys."""
    b, h, tq, _ = q.shape
    tk = k.shape[-2]
    bs = int(block_size)
    nk = -(-tk // bs)
    out = torch.zeros(b, h, -(-tq // bs), nk, dtype=torch.float32, device=q.device)
    sink = torch.zeros(b, h, -(-tq // bs), dtype=torch.float32, device=q.device)
    kpos = torch.arange(tk, device=q.device)
    for i, s in enumerate(range(0, tq, bs)):
        e = min(s + bs, tq)
        scores = (torch.matmul(q[:, :, s:e], k.transpose(-1, -2)) * scale).float()  # [B, H, <=bs, Tk]
        if causal:
            qpos = torch.arange(s, e, device=q.device)[:, None] + (tk - tq)
            scores = scores.masked_fill(kpos[None, :] > qpos, float("-inf"))
        _, probs = lse_and_probs(scores)
        probs = torch.nn.functional.pad(probs.sum(2), (0, nk * bs - tk))  # [B, H, nk * bs]
        out[:, :, i] = probs.view(b, h, nk, bs).sum(-1)
        sink[:, :, i] = probs[..., :sinks].sum(-1)
    return (out, sink) if sinks > 0 else out


def received_attention(q, k, *, scale: float, causal: bool, key_padding_mask=None, chunk: int | None = None,
                       normalise: bool = True):
    """How much attention each key receives, relative to uniform attention: [B, Tk] fp32, the mean over heads of

        r[j] = (1 / #queries that see j) * sum over those queries i of P[i, j] * n_i

    with n_i the number of keys query i sees, so a key that every query attends to uniformly scores 1, one that
    takes all of every query's attention scores about n. Normalising by the queries that see a key is what makes
    the scores of a causal model comparable along the sequence (the first key is seen by every query, the last by
    one); weighting by n_i removes the 1 / n_i that a long causal row spreads over its keys. Padded keys (False in
    key_padding_mask) and padded queries (for self-attention, Tq == Tk) count for nothing: padded keys score 0.
    q [B, H, Tq, D], k [B, H, Tk, D] (heads expanded); causal is bottom-right aligned. Never a Tq x Tk matrix in
    full: `chunk` query rows at a time. `normalise=False`: the plain column sums sum_i P[i, j] (H2O's accumulated
    attention), which favour the early keys of a causal model."""
    b, h, tq, _ = q.shape
    tk = k.shape[-2]
    if chunk is None:
        chunk = max(1, min(tq, (1 << 24) // max(1, b * h * tk)))
    acc = torch.zeros(b, tk, dtype=torch.float32, device=q.device)
    seen = torch.zeros(b, tk, dtype=torch.float32, device=q.device)
    kpm = None if key_padding_mask is None else key_padding_mask.bool()
    qreal = kpm if (kpm is not None and tq == tk) else None
    for s in range(0, tq, chunk):
        e = min(s + chunk, tq)
        allowed, _ = _rows_allowed(s, e, tq, tk, causal=causal, key_padding_mask=kpm, attn_mask=None, device=q.device)
        allowed = (torch.ones(1, 1, e - s, tk, dtype=torch.bool, device=q.device) if allowed is None else allowed)
        allowed = allowed.expand(b, 1, e - s, tk)
        if qreal is not None:
            allowed = allowed & qreal[:, None, s:e, None]
        scores = (torch.matmul(q[:, :, s:e], k.transpose(-1, -2)) * scale).float()
        _, probs = lse_and_probs(scores.masked_fill(~allowed, float("-inf")))  # [B, H, C, Tk]
        if normalise:
            probs = probs * allowed.sum(-1, keepdim=True).float()  # x n_i, the keys query i sees
        acc += probs.mean(1).sum(1)
        seen += allowed[:, 0].float().sum(1)
    if not normalise:
        return acc
    return torch.where(seen > 0, acc / seen.clamp_min(1), torch.zeros_like(acc))
