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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import masks


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
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


def linear_attention(
    phi_q: torch.Tensor,
    phi_k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int = 64,
    key_log_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """key_log_scale b [B, H, Tk] (optional): the key features are exp(b_j) phi_k_j (see the module doc)."""
    out_dtype = v.dtype
    ct = _compute_dtype(phi_q.dtype)
    phi_q, phi_k, v = phi_q.to(ct), phi_k.to(ct), v.to(ct)
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None]
        phi_k = torch.where(keep, phi_k, torch.zeros_like(phi_k))  # padded keys contribute nothing
        if key_log_scale is not None:
            key_log_scale = key_log_scale.masked_fill(~keep[..., 0], float("-inf"))
    if key_log_scale is not None:
        key_log_scale = key_log_scale.to(ct)
        if causal:
            return _causal_chunked_scaled(phi_q, phi_k, v, key_log_scale, chunk_size).to(out_dtype)
        # every query sees every key: one max over the real keys cancels exactly
        m = key_log_scale.detach().amax(-1, keepdim=True)  # (B, H, 1); -inf when every key is padded
        w = torch.exp(key_log_scale - _finite_or_zero(m))  # (B, H, Tk): <= 1, exactly 0 for padded keys
        phi_k = phi_k * w.unsqueeze(-1)
    if not causal:
        kv = torch.einsum("bhkf,bhkd->bhfd", phi_k, v)  # (B, H, F, D)
        z = phi_k.sum(dim=-2)  # (B, H, F)
        num = torch.einsum("bhqf,bhfd->bhqd", phi_q, kv)
        den = torch.einsum("bhqf,bhf->bhq", phi_q, z)
        return _safe_div(num, den).to(out_dtype)
    return _causal_chunked(phi_q, phi_k, v, chunk_size).to(out_dtype)


def _causal_chunked_scaled(phi_q, phi_k, v, lk, chunk: int) -> torch.Tensor:
    """Causal chunked form with key log-scales lk [B, H, Tk] and per-query running-max stabilisers."""
    b, h, tq, f = phi_q.shape
    tk, d = phi_k.shape[-2], v.shape[-1]
    offset = tk - tq  # bottom-right alignment: query i sits at key position i + offset
    state_kv = phi_q.new_zeros(b, h, f, d)
    state_z = phi_q.new_zeros(b, h, f)
    state_max = phi_q.new_full((b, h), float("-inf"))  # P: max b of the keys in the state
    if offset > 0:  # keys before the first query: the initial state, every query sees it
        pre = lk[:, :, :offset]
        state_max = pre.detach().amax(-1)
        w = torch.exp(pre - _finite_or_zero(state_max).unsqueeze(-1)).unsqueeze(-1)  # (B, H, offset, 1)
        state_kv = torch.einsum("bhkf,bhkd->bhfd", phi_k[:, :, :offset] * w, v[:, :, :offset])
        state_z = (phi_k[:, :, :offset] * w).sum(-2)
        phi_k, v, lk = phi_k[:, :, offset:], v[:, :, offset:], lk[:, :, offset:]
    elif offset < 0:  # the first -offset queries see no key at all
        phi_q = phi_q[:, :, -offset:]
    t = phi_q.shape[-2]
    qc, kc, vc = (_chunks(x, chunk) for x in (phi_q, phi_k, v))  # (B, H, N, C, F|D)
    lc = _chunks(lk.unsqueeze(-1), chunk, pad_value=float("-inf")).squeeze(-1)  # (B, H, N, C)
    lc_det = lc.detach()
    # per-chunk local states, each rescaled to its own chunk max m_c (vectorised)
    cmax = lc_det.amax(-1)  # (B, H, N)
    kw = kc * torch.exp(lc - _finite_or_zero(cmax).unsqueeze(-1)).unsqueeze(-1)  # (B, H, N, C, F)
    loc_kv = torch.einsum("bhncf,bhncd->bhnfd", kw, vc)  # (B, H, N, F, D)
    loc_z = kw.sum(-2)  # (B, H, N, F)
    kv, z, p = _carry_states(loc_kv, loc_z, cmax, state_kv, state_z, state_max)  # S_c, z_c, P_c for every chunk
    # per-query stabiliser M_i = max(P_c, running max of b within the chunk up to i)
    qmax = torch.maximum(lc_det.cummax(dim=-1).values, p.unsqueeze(-1))  # (B, H, N, C)
    qfac = _rel_exp(p.unsqueeze(-1), qmax)  # (B, H, N, C): e^{P_c - M_i}
    num = torch.einsum("bhncf,bhnfd->bhncd", qc, kv) * qfac.unsqueeze(-1)
    den = torch.einsum("bhncf,bhnf->bhnc", qc, z) * qfac
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=qc.device).tril()
    # intra-chunk weights e^{b_j - M_i}, masked to j <= i BEFORE the exp (no inf, no NaN gradient)
    logw = (lc.unsqueeze(-2) - _finite_or_zero(qmax).unsqueeze(-1)).masked_fill(~tri, float("-inf"))
    scores = torch.einsum("bhncf,bhnmf->bhncm", qc, kc) * torch.exp(logw)  # (B, H, N, C, C)
    num = num + torch.einsum("bhncm,bhnmd->bhncd", scores, vc)
    den = den + scores.sum(-1)
    return _unchunk(_safe_div(num, den), t, offset)


def _causal_chunked(phi_q, phi_k, v, chunk: int) -> torch.Tensor:
    tq, tk = phi_q.shape[-2], phi_k.shape[-2]
    offset = tk - tq  # bottom-right alignment: query i sits at key position i + offset
    init_kv = init_z = None
    if offset > 0:  # keys before the first query: one state every query sees
        init_kv = torch.einsum("bhkf,bhkd->bhfd", phi_k[:, :, :offset], v[:, :, :offset])
        init_z = phi_k[:, :, :offset].sum(-2)
        phi_k, v = phi_k[:, :, offset:], v[:, :, offset:]
    elif offset < 0:  # the first -offset queries see no key at all
        phi_q = phi_q[:, :, -offset:]
    t = phi_q.shape[-2]
    qc, kc, vc = (_chunks(x, chunk) for x in (phi_q, phi_k, v))  # (B, H, N, C, F|D)
    kv = torch.einsum("bhncf,bhncd->bhnfd", kc, vc)  # per-chunk states (B, H, N, F, D)
    z = kc.sum(dim=-2)  # (B, H, N, F)
    kv = kv.cumsum(dim=2) - kv  # exclusive prefix: what chunk n sees from chunks < n
    z = z.cumsum(dim=2) - z
    if init_kv is not None:
        kv = kv + init_kv[:, :, None]
        z = z + init_z[:, :, None]
    num = torch.einsum("bhncf,bhnfd->bhncd", qc, kv)
    den = torch.einsum("bhncf,bhnf->bhnc", qc, z)
    tri = torch.ones(chunk, chunk, dtype=torch.bool, device=qc.device).tril()
    scores = torch.einsum("bhncf,bhnmf->bhncm", qc, kc).masked_fill(~tri, 0.0)  # (B, H, N, C, C)
    num = num + torch.einsum("bhncm,bhnmd->bhncd", scores, vc)
    den = den + scores.sum(-1)
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
    ct = _compute_dtype(phi_q.dtype)
    phi_q, phi_k = phi_q.to(ct), phi_k.to(ct)
    if key_log_scale is not None and not causal:  # one max over the real keys, as the one-pass form
        lk = key_log_scale.to(ct)
        if key_padding_mask is not None:
            lk = lk.masked_fill(~key_padding_mask[:, None, :], float("-inf"))
        w = torch.exp(lk - _finite_or_zero(lk.detach().amax(-1, keepdim=True)))  # (B, H, Tk)
        phi_k, key_log_scale = phi_k * w.unsqueeze(-1), None
    scores = torch.einsum("bhqf,bhkf->bhqk", phi_q, phi_k)
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
    out = torch.matmul(probs, v.to(ct)).to(v.dtype)
    return out, probs


_GROUP = 32  # chunks per group in the two-level carry


def _carry_states(loc_kv, loc_z, cmax, init_kv, init_z, init_max):
    """States before every chunk: S_c = sum over chunks c' < c of e^{m_c' - P_c} loc_c' (+ the initial state),
    P_c = max(init_max, m_0..m_{c-1}), every factor <= 1 and none depending on chunks >= c (no leak).

    Two levels, so the Python loop runs N / 32 times rather than N: inside a group of g chunks the weights
    e^{m_c' - P_c} form a g x g lower-triangular matrix (one batched matmul); only the group states are
    carried sequentially. loc_kv [B, H, N, F, D], loc_z [B, H, N, F], cmax [B, H, N] (detached).
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
    in_kv = torch.einsum("bhsgc,bhscfd->bhsgfd", w, lkv)
    in_z = torch.einsum("bhsgc,bhscf->bhsgf", w, lz)
    # sequential over groups: the state entering each group, rescaled to its chunks' P_c
    kvs, zs = [], []
    state_kv, state_z, state_max = init_kv, init_z, init_max
    for i in range(s):
        fac = _rel_exp(state_max.unsqueeze(-1), pg[:, :, i])  # (B, H, g): e^{P_group_start - P_c}
        kvs.append(in_kv[:, :, i] + fac[..., None, None] * state_kv.unsqueeze(2))
        zs.append(in_z[:, :, i] + fac[..., None] * state_z.unsqueeze(2))
        new_max = torch.maximum(state_max, cm[:, :, i].amax(-1))
        a_old = _rel_exp(state_max, new_max)  # (B, H)
        a_loc = _rel_exp(cm[:, :, i], new_max.unsqueeze(-1))  # (B, H, g)
        state_kv = a_old[..., None, None] * state_kv + torch.einsum("bhg,bhgfd->bhfd", a_loc, lkv[:, :, i])
        state_z = a_old[..., None] * state_z + torch.einsum("bhg,bhgf->bhf", a_loc, lz[:, :, i])
        state_max = new_max
    kv = torch.stack(kvs, dim=2).reshape(b, h, s * g, f, d)[:, :, :n]
    z = torch.stack(zs, dim=2).reshape(b, h, s * g, f)[:, :, :n]
    return kv, z, p[..., :n]
