"""The kernelised (linear) attention core shared by `linear`, `performer` and `rfa`.

Given feature maps phi(q) [B, H, Tq, F] and phi(k) [B, H, Tk, F]:

    out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)      (j <= i when causal)

Non-causal: one pass, O(T F D). Causal: the chunked form (as in flash-linear-attention): within a chunk
of C tokens the masked C x C quadratic form, across chunks a prefix sum of per-chunk states
phi(K_c)^T V_c, so memory is O(T F D / C) instead of the O(T F D) of a per-token cumulative sum.
A row whose normaliser is exactly 0 (no visible key) returns zeros.

Key log-scales (`key_log_scale` b [B, H, Tk], used by performer and rfa): the true key feature is
exp(b_j) phi(k_j) with phi(k_j) bounded and b_j unbounded (it would overflow exp()). Stabilising it needs
a constant subtracted from b, and in causal mode that constant must not depend on keys a query cannot see:
ONE max over all keys cancels in exact arithmetic, but a large FUTURE key then underflows the earlier keys'
weights and changes earlier outputs (a causal leak). So each query i uses its own stabiliser
M_i = max_{j visible to i} b_j (a running max over keys <= i), and every weight exp(b_j - M_i) <= 1:

    out_i = sum_j e^{b_j - M_i} phi(q_i).phi(k_j) v_j / sum_j e^{b_j - M_i} phi(q_i).phi(k_j)

Chunked: intra-chunk the masked C x C weights e^{b_j - M_i}; across chunks the state
S_c = sum_{j before chunk c} e^{b_j - P_c} phi(k_j) (x) v_j with P_c = max b before chunk c, carried by a
sequential loop over the T / C chunks (S_{c+1} = e^{P_c - P_{c+1}} S_c + [chunk c, rescaled to P_{c+1}]);
query i of chunk c reads it with the factor e^{P_c - M_i} <= 1. The loop costs N = T / C small
[B, H, F, D] updates (Python overhead ~ N x tens of microseconds) on top of the vectorised chunk work;
without key_log_scale (plain `linear`) the fully vectorised cumsum path runs. Non-causal: one max over the
real keys (every query sees every key, so it cancels without any leak). Padded keys get b = -inf (weight
exactly 0); a max over no real key is -inf and is replaced before any exp(-inf - -inf) could happen. The
stabilisers are detached: they cancel, so their true gradient is zero (b itself carries gradient).

Precision (as flash-linear-attention): features, values and per-chunk states stay in the inputs' dtype for
every matmul (bf16 inputs run on tensor cores with fp32 accumulation inside each matmul); what accumulates
over the whole sequence (prefix sums of chunk states and normalisers) and the final division run in fp32.
A normaliser's state enters its matmul as a bf16 hi + lo pair, so its rounding is ~2^-16, not 2^-8 (random
Fourier features have normalisers that cancel).

The causal form also exists as Triton kernels (`ops.linear_triton`), which keep the state on chip and compute
the same function (the same stabilisers): `linear_attention(..., kernel="triton")`. Which one runs is the
calling method's choice (its `backend` option); `triton_unsupported_reasons` says when the kernels cannot.
"""
from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

from .. import masks

TRITON_DIMS = (16, 128)  # head dims and feature dims the Triton kernels take (F may be larger than 128)


def triton_unsupported_reasons(device, *, causal: bool, tq: int | None, tk: int | None, head_dim: int,
                               feature_dim: int, dtype=None) -> list[str]:
    """Why the causal Triton kernels cannot serve a call (empty: they can). They run on CUDA, or on CPU tensors
    under Triton's interpreter (TRITON_INTERPRET=1, set by the test suite before triton is imported)."""
    why = []
    if importlib.util.find_spec("triton") is None:
        why.append("triton is not installed")
    elif device is not None and torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        why.append(f"the Triton kernels need a CUDA device (got {torch.device(device).type})")
    if not causal:
        why.append("the Triton kernels are the causal form (non-causal linear attention is two matmuls)")
    if tq is not None and tk is not None and tq != tk:
        why.append(f"the Triton kernels need Tq == Tk (got {tq}, {tk})")
    lo, hi = TRITON_DIMS
    if not lo <= head_dim <= hi:
        why.append(f"the Triton kernels take head dims {lo}..{hi} (got {head_dim})")
    if feature_dim < lo:
        why.append(f"the Triton kernels take feature dims >= {lo} (got {feature_dim})")
    if dtype is not None and dtype not in (torch.float32, torch.bfloat16, torch.float16):
        why.append(f"the Triton kernels take fp32, bf16 and fp16 (got {dtype})")
    return why


def linear_col_sums(phi_q: torch.Tensor, phi_k: torch.Tensor, *, causal: bool,
                    key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention each key receives, summed over the query rows, without the Tq x Tk matrix [B, H, Tk] fp32:

        col_j = phi(k_j) . sum_{i sees j} phi(q_i) / den_i,   den_i = phi(q_i) . sum_{j seen by i} phi(k_j)

    (no key log-scales: linear attention with a fixed or learned map). Causal: i sees j iff j <= i + Tk - Tq,
    a reverse cumulative sum over the queries. Padded keys get 0; with Tq == Tk padded query rows are left
    out (self-attention: they are the same padded tokens); a row with den 0 contributes nothing."""
    acc = torch.float64 if phi_q.dtype == torch.float64 else torch.float32
    pq, pk = phi_q.to(acc), phi_k.to(acc)
    tq, tk = pq.shape[-2], pk.shape[-2]
    off = tk - tq
    if key_padding_mask is not None:
        pk = pk * key_padding_mask[:, None, :, None].to(acc)
    if causal:
        # den_i = phi_q_i . cumsum(phi_k)[i + off]  (0 when i + off < 0)
        ck = pk.cumsum(-2)  # (B, H, Tk, F)
        idx = torch.arange(tq, device=pq.device) + off
        seen = ck.index_select(-2, idx.clamp(min=0)) * (idx >= 0).to(acc)[:, None]  # (B, H, Tq, F)
        den = (pq * seen).sum(-1)
    else:
        den = (pq * pk.sum(-2, keepdim=True)).sum(-1)  # (B, H, Tq)
    w = pq / den.masked_fill(den == 0, 1.0).unsqueeze(-1) * (den != 0).unsqueeze(-1).to(acc)  # (B, H, Tq, F)
    if key_padding_mask is not None and tq == tk:
        w = w * key_padding_mask[:, None, :, None].to(acc)
    if not causal:
        return (pk * w.sum(-2, keepdim=True)).sum(-1)
    # key j is seen by queries i >= j - off: u_j = sum over those of w_i (a reverse cumsum, shifted by off)
    rev = w.flip(-2).cumsum(-2).flip(-2)  # rev[i] = sum_{i' >= i} w_i'
    start = (torch.arange(tk, device=pq.device) - off).clamp(min=0)  # the first query that sees key j
    u = torch.where((start < tq)[:, None], rev.index_select(-2, start.clamp(max=tq - 1)), torch.zeros((), dtype=acc, device=pq.device))
    return (pk * u).sum(-1)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    zero = den == 0
    return torch.where(zero.unsqueeze(-1), torch.zeros_like(num), num / den.masked_fill(zero, 1.0).unsqueeze(-1))


def _finite_or_zero(m: torch.Tensor) -> torch.Tensor:
    """A stabiliser that is -inf (max over no real key) replaced by 0: then exp(b - m) = exp(-inf) = 0."""
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _rel_exp(a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """exp(a - m) for stabilisers a <= m (detached), with exp(-inf - anything) = 0 and never NaN."""
    return torch.where(torch.isfinite(a), torch.exp(a - _finite_or_zero(m)), torch.zeros_like(a))


def _chunks(x: torch.Tensor, chunk: int, pad_value: float = 0.0) -> torch.Tensor:
    """[B, H, T, F] -> [B, H, N, C, F], zero-padding T up to a multiple of the chunk size."""
    b, h, t, f = x.shape
    n = -(-t // chunk)
    if n * chunk != t:
        x = F.pad(x, (0, 0, 0, n * chunk - t), value=pad_value)
    return x.reshape(b, h, n, chunk, f)


def _unchunk(out: torch.Tensor, t: int, offset: int) -> torch.Tensor:
    """[B, H, N, C, D] -> [B, H, Tq, D]: drop the chunk padding, and put back (as zeros) the first -offset
    queries that see no key when Tk < Tq."""
    b, h, n, c, d = out.shape
    out = out.reshape(b, h, n * c, d)[:, :, :t]
    return F.pad(out, (0, 0, -offset, 0)) if offset < 0 else out


def _den(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """q [..., C, F] (dtype dt) . z [..., F] (fp32) -> [..., C] in fp32; z enters as a dt hi + lo pair."""
    z_hi = z.to(q.dtype)
    pair = torch.stack([z_hi, (z - z_hi.to(z.dtype)).to(q.dtype)], dim=-1)  # (..., F, 2)
    return torch.matmul(q, pair).sum(-1, dtype=z.dtype)


def linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 64,
    key_log_scale: torch.Tensor | None = None,
    kernel: str = "torch",
) -> torch.Tensor:
    """key_log_scale b [B, H, Tk] (optional): the key features are exp(b_j) phi_k_j (see the module doc).
    kernel: "torch" (the chunked PyTorch form) or "triton" (causal only; the caller checked it can run). With
    "triton", phi_k, v and key_log_scale may have fewer heads than phi_q (GQA: the kernels read kv head h // G);
    the PyTorch form needs them expanded."""
    dt = v.dtype  # matmul dtype
    acc = compute_dtype(dt)  # sums over the sequence, normalisers, the division
    phi_q, phi_k = phi_q.to(dt), phi_k.to(dt)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None]
        phi_k = torch.where(keep, phi_k, torch.zeros_like(phi_k))  # padded keys contribute nothing
        if key_log_scale is not None:
            key_log_scale = key_log_scale.masked_fill(~keep[..., 0], float("-inf"))
    if kernel == "triton":
        from . import linear_triton

        lk = None if key_log_scale is None else key_log_scale.to(acc)
        return linear_triton.causal_linear(phi_q, phi_k, v, lk)
    if key_log_scale is not None:
        key_log_scale = key_log_scale.to(acc)
        if causal:
            return _causal_chunked_scaled(phi_q, phi_k, v, key_log_scale, chunk_size).to(dt)
        # every query sees every key: one max over the real keys cancels exactly
        m = key_log_scale.detach().amax(-1, keepdim=True)  # (B, H, 1); -inf when every key is padded
        w = torch.exp(key_log_scale - _finite_or_zero(m))  # (B, H, Tk): <= 1, exactly 0 for padded keys
        phi_k = (phi_k * w.unsqueeze(-1)).to(dt)
    if not causal:
        kv = torch.matmul(phi_k.transpose(-1, -2), v)  # (B, H, F, D)
        z = phi_k.sum(dim=-2, dtype=acc)  # (B, H, F)
        num = torch.matmul(phi_q, kv)  # (B, H, Tq, D)
        return _safe_div(num.to(acc), _den(phi_q, z)).to(dt)
    return _causal_chunked(phi_q, phi_k, v, chunk_size).to(dt)


def _causal_chunked_scaled(phi_q, phi_k, v, lk, chunk: int) -> torch.Tensor:
    """Causal chunked form with key log-scales lk [B, H, Tk] (fp32) and per-query running-max stabilisers."""
    b, h, tq, f = phi_q.shape
    tk, d = phi_k.shape[-2], v.shape[-1]
    dt, acc = v.dtype, lk.dtype
    offset = tk - tq  # bottom-right alignment: query i sits at key position i + offset
    state_kv = phi_q.new_zeros(b, h, f, d, dtype=acc)
    state_z = phi_q.new_zeros(b, h, f, dtype=acc)
    state_max = lk.new_full((b, h), float("-inf"))  # P: max b of the keys in the state
    if offset > 0:  # keys before the first query: the initial state, every query sees it
        pre = lk[:, :, :offset]
        state_max = pre.detach().amax(-1)
        w = torch.exp(pre - _finite_or_zero(state_max).unsqueeze(-1)).unsqueeze(-1)  # (B, H, offset, 1)
        kw = (phi_k[:, :, :offset] * w).to(dt)
        state_kv = torch.matmul(kw.transpose(-1, -2), v[:, :, :offset]).to(acc)
        state_z = kw.sum(-2, dtype=acc)
        phi_k, v, lk = phi_k[:, :, offset:], v[:, :, offset:], lk[:, :, offset:]
    elif offset < 0:  # the first -offset queries see no key at all
        phi_q = phi_q[:, :, -offset:]
    t = phi_q.shape[-2]
    qc, kc, vc = (_chunks(x, chunk) for x in (phi_q, phi_k, v))  # (B, H, N, C, F|D)
    lc = _chunks(lk.unsqueeze(-1), chunk, pad_value=float("-inf")).squeeze(-1)  # (B, H, N, C)
    lc_det = lc.detach()
    # per-chunk local states, each rescaled to its own chunk max m_c (vectorised)
    cmax = lc_det.amax(-1)  # (B, H, N)
    kw = (kc * torch.exp(lc - _finite_or_zero(cmax).unsqueeze(-1)).unsqueeze(-1)).to(dt)  # (B, H, N, C, F)
    loc_kv = torch.matmul(kw.transpose(-1, -2), vc)  # (B, H, N, F, D)
    loc_z = kw.sum(-2, dtype=acc)  # (B, H, N, F)
    kv, z, p = _carry_states(loc_kv, loc_z, cmax, state_kv, state_z, state_max)  # S_c, z_c, P_c for every chunk
    # per-query stabiliser M_i = max(P_c, running max of b within the chunk up to i)
    qmax = torch.maximum(lc_det.cummax(dim=-1).values, p.unsqueeze(-1))  # (B, H, N, C)
    qfac = _rel_exp(p.unsqueeze(-1), qmax)  # (B, H, N, C): e^{P_c - M_i}
    num = torch.matmul(qc, kv) * qfac.unsqueeze(-1)  # (B, H, N, C, D), fp32
    den = _den(qc, z) * qfac  # (B, H, N, C)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=qc.device).tril()
    # intra-chunk weights e^{b_j - M_i}, masked to j <= i BEFORE the exp (no inf, no NaN gradient)
    logw = (lc.unsqueeze(-2) - _finite_or_zero(qmax).unsqueeze(-1)).masked_fill(~tri, float("-inf"))
    scores = torch.matmul(qc, kc.transpose(-1, -2)) * torch.exp(logw)  # (B, H, N, C, C), fp32
    num = num + torch.matmul(scores.to(dt), vc)
    den = den + scores.sum(-1)
    return _unchunk(_safe_div(num, den), t, offset)


def linear_parts(phi_q, phi_k, v, *, causal: bool, key_padding_mask=None, chunk_size: int = 64):
    """The numerator [B, H, Tq, D] and normaliser [B, H, Tq] of linear attention before the division, both in
    fp32 (no key log-scales): for methods that add other terms to both (the hybrid window + linear attention)."""
    dt, acc = v.dtype, compute_dtype(v.dtype)
    phi_q, phi_k = phi_q.to(dt), phi_k.to(dt)
    if key_padding_mask is not None:
        phi_k = torch.where(key_padding_mask[:, None, :, None], phi_k, torch.zeros_like(phi_k))
    if not causal:
        kv = torch.matmul(phi_k.transpose(-1, -2), v)  # (B, H, F, D)
        return torch.matmul(phi_q, kv).to(acc), _den(phi_q, phi_k.sum(dim=-2, dtype=acc))
    return _causal_chunked(phi_q, phi_k, v, chunk_size, parts=True)


def _causal_chunked(phi_q, phi_k, v, chunk: int, parts: bool = False):
    dt, acc = v.dtype, compute_dtype(v.dtype)
    tq, tk = phi_q.shape[-2], phi_k.shape[-2]
    offset = tk - tq  # bottom-right alignment: query i sits at key position i + offset
    init_kv = init_z = None
    if offset > 0:  # keys before the first query: one state every query sees
        init_kv = torch.matmul(phi_k[:, :, :offset].transpose(-1, -2), v[:, :, :offset]).to(acc)
        init_z = phi_k[:, :, :offset].sum(-2, dtype=acc)
        phi_k, v = phi_k[:, :, offset:], v[:, :, offset:]
    elif offset < 0:  # the first -offset queries see no key at all
        phi_q = phi_q[:, :, -offset:]
    t = phi_q.shape[-2]
    qc, kc, vc = (_chunks(x, chunk) for x in (phi_q, phi_k, v))  # (B, H, N, C, F|D)
    kv = torch.matmul(kc.transpose(-1, -2), vc)  # per-chunk states (B, H, N, F, D)
    z = kc.sum(dim=-2, dtype=acc)  # (B, H, N, F)
    # exclusive prefix in fp32 (what chunk n sees from chunks < n) by shifting the inclusive one: cum - kv
    # would round differently when a LATER chunk changes (measured 1.8e-7 on CUDA: a rounding-level leak)
    kv = F.pad(kv[:, :, :-1].cumsum(dim=2, dtype=acc), (0, 0, 0, 0, 1, 0))
    z = F.pad(z[:, :, :-1].cumsum(dim=2), (0, 0, 1, 0))
    if init_kv is not None:
        kv = kv + init_kv[:, :, None]
        z = z + init_z[:, :, None]
    num = torch.matmul(qc, kv.to(dt)).to(acc)  # (B, H, N, C, D)
    den = _den(qc, z)  # (B, H, N, C)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=qc.device).tril()
    scores = torch.matmul(qc, kc.transpose(-1, -2)).masked_fill(~tri, 0.0)  # (B, H, N, C, C)
    num = num + torch.matmul(scores, vc)
    den = den + scores.sum(-1, dtype=acc)
    if parts:  # (B, H, Tq, D), (B, H, Tq): rows before the first key (Tk < Tq) get 0 / 0
        return _unchunk(num.to(acc), t, offset), _unchunk(den.unsqueeze(-1), t, offset).squeeze(-1)
    return _unchunk(_safe_div(num, den), t, offset)


def linear_attention_quadratic(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    key_log_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function in its O(T^2) form; returns (out, implied probs). Reference and need_probs path.
    With key_log_scale: non-causal, one max over the real keys; causal, each row's max b over the keys it
    sees (both cancel; the causal one never depends on a later key)."""
    # the same precision convention as `dense` (and the chunked form): features and scores in the inputs'
    # dtype, weights / normalisation in fp32, probabilities rounded to the inputs' dtype for the value matmul
    dt = v.dtype
    ct = compute_dtype(dt)
    phi_q, phi_k = phi_q.to(dt), phi_k.to(dt)
    if key_log_scale is not None and not causal:  # one max over the real keys, as the one-pass form
        lk = key_log_scale.to(ct)
        if key_padding_mask is not None:
            lk = lk.masked_fill(~key_padding_mask[:, None, :], float("-inf"))
        w = torch.exp(lk - _finite_or_zero(lk.detach().amax(-1, keepdim=True)))  # (B, H, Tk)
        phi_k, key_log_scale = (phi_k * w.unsqueeze(-1)).to(dt), None
    scores = torch.matmul(phi_q, phi_k.transpose(-1, -2)).to(ct)  # (B, H, Tq, Tk)
    allowed, _ = masks.combine(
        phi_q.shape[-2], phi_k.shape[-2], causal=causal, key_padding_mask=key_padding_mask, device=phi_q.device
    )
    if key_log_scale is not None:  # causal: each row's own max over the keys it sees (no future key in it)
        logw = key_log_scale.to(ct).unsqueeze(-2).expand_as(scores)  # (B, H, Tq, Tk)
        if allowed is not None:
            logw = logw.masked_fill(~allowed, float("-inf"))  # before the exp: no inf * 0
        row_max = logw.detach().amax(-1, keepdim=True)  # (B, H, Tq, 1); -inf for a row with no key
        scores = scores * torch.exp(logw - _finite_or_zero(row_max))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, 0.0)
    den = scores.sum(-1, keepdim=True)
    probs = torch.where(den == 0, torch.zeros_like(scores), scores / den.masked_fill(den == 0, 1.0))
    out = torch.matmul(probs.to(dt), v)
    return out, probs


_GROUP = 32  # chunks per group in the two-level carry


def _carry_states(loc_kv, loc_z, cmax, init_kv, init_z, init_max):
    """States before every chunk: S_c = sum over chunks c' < c of e^{m_c' - P_c} loc_c' (+ the initial state),
    P_c = max(init_max, m_0..m_{c-1}), every factor <= 1 and none depending on chunks >= c (no leak).

    Two levels, so the Python loop runs N / 32 times rather than N: inside a group of g chunks the weights
    e^{m_c' - P_c} form a g x g lower-triangular matrix (one batched matmul); only the group states are
    carried sequentially. loc_kv [B, H, N, F, D] (matmul dtype), loc_z [B, H, N, F], cmax [B, H, N] (fp32,
    detached). Returns kv in loc_kv's dtype (carried in fp32), z and P in fp32.
    """
    b, h, n, f, d = loc_kv.shape
    g = min(_GROUP, n)
    s = -(-n // g)
    pad = s * g - n
    if pad:
        loc_kv = F.pad(loc_kv, (0, 0, 0, 0, 0, pad))
        loc_z = F.pad(loc_z, (0, 0, 0, pad))
        cmax = F.pad(cmax, (0, pad), value=float("-inf"))
    # P_c, exclusive running max over chunks (and the initial state)
    incl = torch.maximum(cmax.cummax(dim=-1).values, init_max.unsqueeze(-1))  # (B, H, N): max up to chunk c
    p = torch.cat([init_max.unsqueeze(-1), incl[..., :-1]], dim=-1)  # (B, H, N): max before chunk c
    lkv = loc_kv.reshape(b, h, s, g, f, d)
    lz = loc_z.reshape(b, h, s, g, f)
    cm = cmax.reshape(b, h, s, g)
    pg = p.reshape(b, h, s, g)
    strict = torch.ones(g, g, dtype=torch.bool, device=cmax.device).tril(-1)  # c' < c within the group
    # in-group weights W[c, c'] = e^{m_c' - P_c}, c' < c (both in the group): exponent <= 0
    logw = (cm.unsqueeze(-2) - _finite_or_zero(pg).unsqueeze(-1)).masked_fill(~strict, float("-inf"))
    w = torch.where(torch.isfinite(logw), torch.exp(logw), torch.zeros_like(logw))  # (B, H, S, g, g)
    # (B, H, S, g, F*D): the chunk states of a group combined by one matmul in the states' dtype
    in_kv = torch.matmul(w.to(lkv.dtype), lkv.flatten(-2)).unflatten(-1, (f, d))
    in_z = torch.matmul(w, lz)  # (B, H, S, g, F), fp32
    # sequential over groups: the state entering each group (fp32), rescaled to its chunks' P_c
    kvs, zs = [], []
    state_kv, state_z, state_max = init_kv, init_z, init_max
    # unbind, not [:, :, i]: indexing's backward writes a zero tensor of the full size per group (measured:
    # half of a causal Performer's fwd+bwd at 64k), unbind's is one stack
    groups = zip(in_kv.unbind(2), in_z.unbind(2), lkv.flatten(-2).unbind(2), lz.unbind(2), cm.unbind(2), pg.unbind(2))
    for g_in_kv, g_in_z, g_kv, g_z, g_cm, g_p in groups:
        fac = _rel_exp(state_max.unsqueeze(-1), g_p)  # (B, H, g): e^{P_group_start - P_c}
        kvs.append((g_in_kv + fac[..., None, None] * state_kv.unsqueeze(2)).to(lkv.dtype))
        zs.append(g_in_z + fac[..., None] * state_z.unsqueeze(2))
        new_max = torch.maximum(state_max, g_cm.amax(-1))
        a_old = _rel_exp(state_max, new_max)  # (B, H)
        a_loc = _rel_exp(g_cm, new_max.unsqueeze(-1))  # (B, H, g)
        group_kv = torch.matmul(a_loc.unsqueeze(-2).to(lkv.dtype), g_kv).squeeze(-2).unflatten(-1, (f, d))
        state_kv = a_old[..., None, None] * state_kv + group_kv
        state_z = a_old[..., None] * state_z + torch.matmul(a_loc.unsqueeze(-2), g_z).squeeze(-2)
        state_max = new_max
    kv = torch.stack(kvs, dim=2).reshape(b, h, s * g, f, d)[:, :, :n]
    z = torch.stack(zs, dim=2).reshape(b, h, s * g, f)[:, :, :n]
    return kv, z, p[..., :n]
