"""Reformer LSH attention (`lsh`): exact limit, bucket locality, causality, masks, errors.

Two references live here:
- `shared_qk_dense`: dense shared-QK attention (keys = q/|q|, diagonal -1e5 not -inf), the exact limit of
  shared_qk=True with one bucket (the ordinary `helpers.reference` is the limit of shared_qk=False);
- `loop_lsh`: a slow, per-query Python transcription of the algorithm (hash, sort, chunk, look one back,
  same bucket, combine rounds by log-sum-exp) that checks the vectorised code with several buckets.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from attnlab import masks
from attnlab.methods.base import repeat_kv
from tests.helpers import FACTOR, FLOOR, assert_matches_reference, grads, make, max_err, rand_qkv

SELF = -1e5


def shared_qk_dense(q, v, *, causal=False, key_padding_mask=None, scale=None, dtype=torch.float64):
    """Dense shared-QK attention in `dtype`: softmax(q (q/|q|)^T * scale, diag -1e5, + masks) v."""
    q, v = q.to(dtype), repeat_kv(v, q.shape[1] // v.shape[1]).to(dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    t = q.shape[-2]
    scores = q @ F.normalize(q, dim=-1).transpose(-1, -2) * scale  # (B, H, T, T)
    scores = scores.masked_fill(torch.eye(t, dtype=torch.bool), SELF)
    allowed, _ = masks.combine(t, t, causal=causal, key_padding_mask=key_padding_mask)
    probs = masks.masked_softmax(scores, allowed)  # fp32 for bf16, as `dense` does
    return probs.to(v.dtype) @ v


def assert_shared_rule(out, q, v, **kw):
    """Flash-attention's rule against the shared-QK reference: err <= FACTOR * err(ref in dtype) + FLOOR."""
    assert torch.isfinite(out).all()
    ref = shared_qk_dense(q.detach(), v.detach(), **kw)
    err = max_err(out, ref)
    bound = FACTOR * max_err(shared_qk_dense(q.detach(), v.detach(), dtype=q.dtype, **kw), ref) + FLOOR[q.dtype]
    assert err <= bound, f"max abs error {err:.3e} > bound {bound:.3e} ({q.dtype})"
    return err


def loop_lsh(m, q, k, v, *, causal=False, key_padding_mask=None):
    """Per-query transcription of Reformer LSH in fp64. Returns (out [B,H,T,D], probs [B,H,T,T])."""
    o = m.opts
    q, k, v = (x.detach().double() for x in (q, repeat_kv(k, q.shape[1] // k.shape[1]), repeat_kv(v, q.shape[1] // v.shape[1])))
    b_, h_, t, d = q.shape
    scale = d ** -0.5
    nb = m.n_buckets(t)
    chunk = min(o.bucket_size, t)
    rot = m.rotations(nb, q.device, torch.float64) if nb > 1 else None  # (D, R, nb/2)
    out = torch.zeros_like(q)
    probs = torch.zeros(b_, h_, t, t, dtype=torch.float64)
    real = torch.ones(b_, t, dtype=torch.bool) if key_padding_mask is None else key_padding_mask
    for b in range(b_):
        for h in range(h_):
            qs = q[b, h]
            ks = F.normalize(qs, dim=-1) if o.shared_qk else k[b, h]
            per_round = []  # (lse [T], out [T, D], weights [T, T]) per round
            for r in range(o.n_hashes):
                def bucket(x):
                    if nb == 1:
                        return [0] * t
                    xr = x @ rot[:, r]
                    return torch.cat([xr, -xr], -1).argmax(-1).tolist()

                qb, kb = bucket(qs), bucket(ks)
                # padded positions after every real one, each side by (bucket, position)
                q_sorted = sorted(range(t), key=lambda i: (not real[b, i], qb[i], i))
                k_sorted = sorted(range(t), key=lambda j: (not real[b, j], kb[j], j))
                lse, ro, rw = torch.full((t,), -math.inf, dtype=torch.float64), torch.zeros(t, d, dtype=torch.float64), torch.zeros(t, t, dtype=torch.float64)
                for slot, i in enumerate(q_sorted):
                    c = slot // chunk
                    window = k_sorted[c * chunk:(c + 1) * chunk] + (k_sorted[(c - 1) * chunk:c * chunk] if c > 0 else [])
                    keys = [j for j in window if kb[j] == qb[i] and real[b, j] and (not causal or j <= i)]
                    if not keys:
                        continue
                    s = torch.stack([qs[i] @ ks[j] * scale for j in keys])
                    if o.shared_qk:
                        s = torch.where(torch.tensor(keys) == i, torch.tensor(SELF, dtype=torch.float64), s)
                    lse[i] = torch.logsumexp(s, 0)
                    p = torch.exp(s - lse[i])
                    ro[i] = p @ v[b, h, keys]
                    rw[i, keys] = p
                per_round.append((lse, ro, rw))
            lses = torch.stack([x[0] for x in per_round])  # (R, T)
            any_key = torch.isfinite(lses).any(0)
            w = torch.softmax(lses.masked_fill(~any_key, 0.0), 0) * any_key  # (R, T)
            out[b, h] = sum(w[r, :, None] * per_round[r][1] for r in range(o.n_hashes))
            probs[b, h] = sum(w[r, :, None] * per_round[r][2] for r in range(o.n_hashes))
    return out, probs


# ---- exact limit: one bucket, one chunk --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_hashes", [1, 2])
@pytest.mark.parametrize("mode", ["plain", "causal", "padding"])
def test_shared_qk_one_bucket_is_dense_shared_qk(dtype, n_hashes, mode):
    q, k, v = rand_qkv(b=2, h=4, tq=24, d=16, dtype=dtype, seed=1)
    kw = {}
    if mode == "causal":
        kw["causal"] = True
    if mode == "padding":
        kpm = torch.ones(2, 24, dtype=torch.bool)
        kpm[1, 17:] = False
        kw["key_padding_mask"] = kpm
    m = make("lsh", q, k, bucket_size=32, n_hashes=n_hashes)
    out, _ = m(q, k, v, **kw)
    err = assert_shared_rule(out, q, v, **kw)
    print(f"lsh shared_qk one bucket {dtype} R={n_hashes} {mode}: max err {err:.2e}")


def test_shared_qk_ignores_k():
    q, k, v = rand_qkv(tq=20, seed=2)
    m = make("lsh", q, k, bucket_size=4)
    assert torch.equal(m(q, k, v)[0], m(q, torch.randn_like(k), v)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n_hashes", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
def test_separate_qk_one_bucket_is_dense(dtype, n_hashes, causal):
    q, k, v = rand_qkv(b=2, h=4, tq=24, d=16, dtype=dtype, seed=3)
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[0, 20:] = False
    m = make("lsh", q, k, bucket_size=24, n_hashes=n_hashes, shared_qk=False)
    out, _ = m(q, k, v, causal=causal, key_padding_mask=kpm)
    err = assert_matches_reference(out, q, k, v, causal=causal, key_padding_mask=kpm)
    print(f"lsh shared_qk=False one bucket {dtype} R={n_hashes} causal={causal}: max err {err:.2e}")


@pytest.mark.parametrize("causal", [False, True])
def test_one_bucket_probs_are_dense_shared_qk_probs(causal):
    q, k, v = rand_qkv(b=1, h=2, tq=12, dtype=torch.float64, seed=4)
    _, probs = make("lsh", q, k, bucket_size=16)(q, k, v, causal=causal, need_probs=True)
    scores = q @ F.normalize(q, dim=-1).transpose(-1, -2) * 16 ** -0.5
    scores = scores.masked_fill(torch.eye(12, dtype=torch.bool), SELF)
    ref = masks.masked_softmax(scores, masks.causal_allowed(12, 12) if causal else None)
    assert max_err(probs, ref) < 1e-12


@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_in_exact_limit(shared_qk, causal):
    q, k, v = rand_qkv(b=1, h=2, tq=16, d=8, dtype=torch.float64, seed=5)
    m = make("lsh", q, k, bucket_size=16, n_hashes=2, shared_qk=shared_qk)
    got = grads(lambda a, b, c: m(a, b, c, causal=causal)[0], q, k, v)
    if shared_qk:
        want = grads(lambda a, b, c: shared_qk_dense(a, c, causal=causal), q, k, v)
        assert got[1] is None  # k is ignored
        pairs = [(got[0], want[0]), (got[2], want[2])]
    else:
        from attnlab.methods.dense import dense_attention

        want = grads(lambda a, b, c: dense_attention(a, b, c, causal=causal)[0], q, k, v)
        pairs = list(zip(got, want))
    for g, w in pairs:
        assert max_err(g, w) < 1e-10
    # fp32 gradients against the fp64 reference gradients
    g32 = grads(lambda a, b, c: m(a, b, c, causal=causal)[0], *(x.float() for x in (q, k, v)))
    for g, w in zip(g32, want):
        if g is not None and w is not None:
            assert max_err(g, w) < 1e-4


# ---- several buckets: the algorithm itself -----------------------------------------------------------
@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t", [40, 37])  # 37: internal padding to whole chunks
def test_several_buckets_match_loop_transcription(shared_qk, causal, t):
    q, k, v = rand_qkv(b=1, h=2, tq=t, d=8, dtype=torch.float64, seed=6)
    kpm = torch.ones(1, t, dtype=torch.bool)
    kpm[0, 3] = kpm[0, t - 2] = False
    m = make("lsh", q, k, bucket_size=8, n_hashes=2, seed=11, shared_qk=shared_qk)
    out, probs = m(q, k, v, causal=causal, key_padding_mask=kpm, need_probs=True)
    ref_out, ref_probs = loop_lsh(m, q, k, v, causal=causal, key_padding_mask=kpm)
    assert max_err(out, ref_out) < 1e-10
    assert max_err(probs, ref_probs) < 1e-12
    assert m.n_buckets(t) == 6  # ceil(40/8) = ceil(37/8) = 5, rounded up to even
    # the several buckets really split the keys: the matrix is far from dense
    assert (probs > 0).float().mean() < 0.5


@pytest.mark.parametrize("shared_qk", [True, False])
def test_one_crowded_bucket_looks_back_exactly_one_chunk(shared_qk):
    """All tokens in one bucket over 4 chunks: query chunk c sees key chunks c and c-1 only (chunk 0 does
    not wrap around to the last chunk; no key is counted twice)."""
    t, bs = 32, 8
    g = torch.Generator().manual_seed(19)
    base = torch.randn(16, generator=g, dtype=torch.float64)
    q = (base + 0.01 * torch.randn(1, 2, t, 16, generator=g, dtype=torch.float64))
    k, v = q.clone(), torch.randn(1, 2, t, 16, generator=g, dtype=torch.float64)
    m = make("lsh", q, k, bucket_size=bs, n_hashes=1, shared_qk=shared_qk)
    rot = m.rotations(m.n_buckets(t), q.device, torch.float64)[:, 0]
    xr = q @ rot
    assert torch.cat([xr, -xr], -1).argmax(-1).unique().numel() == 1  # really one crowded bucket
    out, probs = m(q, k, v, need_probs=True)
    chunk = torch.arange(t) // bs  # sort by (bucket, position) = identity here
    window = (chunk[None, :] == chunk[:, None]) | (chunk[None, :] == chunk[:, None] - 1)
    if shared_qk:
        window &= ~torch.eye(t, dtype=torch.bool)  # self gets exactly 0 when others are visible
    assert (probs[..., ~window] == 0).all() and (probs[..., window] > 0).all()
    assert max_err(out, loop_lsh(m, q, k, v)[0]) < 1e-10


def test_probs_live_on_own_bucket_within_chunk_window():
    """Independent of the implementation's sort: recompute buckets and windows with Python lists."""
    t, bs = 48, 8
    q, k, v = rand_qkv(b=1, h=3, tq=t, d=16, seed=7)
    m = make("lsh", q, k, bucket_size=bs, n_hashes=1, seed=3)
    out, probs = m(q, k, v, need_probs=True)
    nb = m.n_buckets(t)
    assert nb == 6
    rot = m.rotations(nb, q.device, torch.float32)[:, 0]  # (D, nb/2)
    for h in range(3):
        xr = q[0, h] @ rot
        bkt = torch.cat([xr, -xr], -1).argmax(-1).tolist()
        order = sorted(range(t), key=lambda i: (bkt[i], i))
        slot = {i: s for s, i in enumerate(order)}
        for i in range(t):
            c = slot[i] // bs
            window = {order[s] for s in range(max(0, (c - 1) * bs), (c + 1) * bs)}
            ok = torch.tensor([j in window and bkt[j] == bkt[i] for j in range(t)])
            row = probs[0, h, i]
            assert (row[~ok] == 0).all(), f"head {h} query {i}: weight outside its bucket/window"
            assert abs(row.sum().item() - 1) < 1e-5
            if ok.sum() > 1:
                assert row[i] == 0  # self only as a last resort
    assert max_err(probs.to(v.dtype) @ v, out) < 1e-5  # the matrix is the one the output used


def test_error_falls_as_bucket_size_grows():
    t = 128
    q, k, v = rand_qkv(b=2, h=4, tq=t, d=16, seed=8, std=2.0)
    ref = shared_qk_dense(q, v)
    errs = []
    for bs in (4, 16, 64, 128):
        out, _ = make("lsh", q, k, bucket_size=bs, n_hashes=2)(q, k, v)
        errs.append((out.double() - ref).abs().mean().item())
    print("lsh mean abs error vs shared-QK dense, bucket_size 4/16/64/128:", [f"{e:.3f}" for e in errs])
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] < 1e-6  # bucket_size >= T: exact


def test_more_hash_rounds_recover_more_mass():
    """More rounds see a larger union of keys: mean error vs shared-QK dense falls from 1 to 8 rounds."""
    q, k, v = rand_qkv(b=2, h=4, tq=96, d=16, seed=9, std=2.0)
    ref = shared_qk_dense(q, v)
    e1, e8 = ((make("lsh", q, k, bucket_size=8, n_hashes=n)(q, k, v)[0].double() - ref).abs().mean().item() for n in (1, 8))
    assert e8 < e1


# ---- causality ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shared_qk", [True, False])
def test_causal_never_weights_a_future_key(shared_qk):
    q, k, v = rand_qkv(b=2, h=4, tq=64, d=16, seed=10)
    m = make("lsh", q, k, bucket_size=8, n_hashes=3, shared_qk=shared_qk)
    out, probs = m(q, k, v, causal=True, need_probs=True)
    assert (torch.triu(probs, diagonal=1) == 0).all()
    # ... and after an arbitrary change of the future, too
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, 30:] = torch.randn_like(x[:, :, 30:])
    out2, probs2 = m(q2, k2, v2, causal=True, need_probs=True)
    assert (torch.triu(probs2, diagonal=1) == 0).all()
    # the earlier outputs are built from earlier values only: out[:t] == P[:t, :t] @ v[:t]
    head = probs2[:, :, :30, :30].to(v.dtype) @ v2[:, :, :30]
    assert max_err(head, out2[:, :, :30]) < 1e-5


@pytest.mark.parametrize("shared_qk", [True, False])
def test_causal_outputs_invariant_when_sort_order_is(shared_qk):
    """Future perturbations that keep every bucket (values; q/k scaled by 2, which argmax and q/|q| ignore
    exactly) leave outputs at <= t bit-identical. An arbitrary change of future q/k may move a later token
    into an earlier chunk and so change an earlier query's window: Reformer's chunking is not prefix-causal
    in that sense (no future key is weighted, see above), so that is not asserted."""
    t = 29
    q, k, v = rand_qkv(b=2, h=4, tq=64, d=16, seed=12)
    m = make("lsh", q, k, bucket_size=8, n_hashes=2, shared_qk=shared_qk)
    out, _ = m(q, k, v, causal=True)
    v2 = v.clone()
    v2[:, :, t + 1:] = torch.randn_like(v2[:, :, t + 1:])
    q2, k2 = q.clone(), k.clone()
    q2[:, :, t + 1:] *= 2.0
    k2[:, :, t + 1:] *= 2.0
    for args in ((q, k, v2), (q2, k2, v), (q2, k2, v2)):
        out2, _ = m(*args, causal=True)
        assert torch.equal(out2[:, :, : t + 1], out[:, :, : t + 1])
        assert not torch.equal(out2, out)  # the future itself did change


# ---- masks, shapes, dtypes ---------------------------------------------------------------------------
@pytest.mark.parametrize("shared_qk", [True, False])
def test_padding_equals_unpadded_in_exact_limit(shared_qk):
    q, k, v = rand_qkv(b=2, h=2, tq=20, seed=13)
    n = 14
    kpm = torch.zeros(2, 20, dtype=torch.bool)
    kpm[:, :n] = True
    m = make("lsh", q, k, bucket_size=32, shared_qk=shared_qk)
    for causal in (False, True):
        padded, _ = m(q, k, v, causal=causal, key_padding_mask=kpm)
        short, _ = m(q[:, :, :n], k[:, :, :n], v[:, :, :n], causal=causal)
        assert max_err(padded[:, :, :n], short) < 1e-6


@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_what_padded_positions_hold_never_reaches_a_real_row(shared_qk, causal):
    """Several buckets: a padded key (or, shared, a padded query) sorted among the real ones would push real keys
    into other chunks, so its values changed real outputs (by up to 2 before); padded positions now sort last."""
    q, k, v = rand_qkv(b=2, h=2, tq=64, d=16, seed=21)
    kpm = torch.ones(2, 64, dtype=torch.bool)
    kpm[0, 50:] = False
    kpm[1, :9] = False  # left padding too
    m = make("lsh", q, k, bucket_size=16, n_hashes=2, shared_qk=shared_qk)
    out, _ = m(q, k, v, causal=causal, key_padding_mask=kpm)
    pad = ~kpm[:, None, :, None]
    other, _ = m(q + 3 * pad, k + 5 * pad, v * (1 + 6 * pad), causal=causal, key_padding_mask=kpm)
    real = kpm[:, None, :, None].expand_as(out)
    assert m.n_buckets(64) > 1 and torch.equal(out[real], other[real])


@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("bucket_size", [4, 32])
def test_fully_masked_rows_are_zero_and_finite(shared_qk, bucket_size):
    q, k, v = rand_qkv(b=3, h=2, tq=24, seed=14)
    kpm = torch.ones(3, 24, dtype=torch.bool)
    kpm[0] = False  # a batch row with no real key
    kpm[1, :5] = False  # left padding: with causal, queries 0..4 see nothing, not even themselves
    m = make("lsh", q, k, bucket_size=bucket_size, shared_qk=shared_qk)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    out, probs = m(q, k, v, causal=True, key_padding_mask=kpm, need_probs=True)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()
    assert (out[0] == 0).all() and (probs[0] == 0).all()
    assert (out[1, :, :5] == 0).all() and (probs[1, :, :5] == 0).all()  # -1e5 self did not unmask a pad
    assert (probs[..., ~kpm[1]][1] == 0).all()  # nobody weights a padded key
    sums = probs[1, :, 5:].sum(-1)
    if shared_qk:  # its own (real) key is always in a query's window: every real row sums to 1
        assert torch.allclose(sums, torch.ones_like(sums))
    else:  # separate q/k buckets: a query may find no key of its bucket in its window (row of zeros)
        assert ((sums - 1).abs() < 1e-5).logical_or(sums == 0).all()
        assert torch.equal(sums == 0, (out[1, :, 5:] == 0).all(-1))
    out.sum().backward()
    for x in (q, k, v):
        assert x.grad is None or torch.isfinite(x.grad).all()


@pytest.mark.parametrize("shared_qk", [True, False])
def test_bf16_several_buckets_finite_and_close_to_fp32(shared_qk):
    q, k, v = rand_qkv(b=2, h=2, tq=50, seed=17)
    m = make("lsh", q, k, bucket_size=8, n_hashes=2, shared_qk=shared_qk)
    out32, _ = m(q, k, v, causal=True)
    out16, _ = m(*(x.bfloat16() for x in (q, k, v)), causal=True)
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
    # bf16 rounding of q can flip a bucket near a boundary, so only most rows must agree closely
    close = ((out16.double() - out32.double()).abs().amax(-1) < 3e-2).float().mean()
    assert close > 0.9


def test_seed_determinism():
    q, k, v = rand_qkv(tq=40, seed=18)
    a = make("lsh", q, k, bucket_size=4, seed=5)(q, k, v)[0]
    b = make("lsh", q, k, bucket_size=4, seed=5)(q, k, v)[0]
    c = make("lsh", q, k, bucket_size=4, seed=6)(q, k, v)[0]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---- errors before compute ---------------------------------------------------------------------------


@pytest.mark.parametrize("slice_elements", [1 << 26, 40])
def test_hash_is_argmax_over_plus_minus_rotations(slice_elements, monkeypatch):
    """The hash (bucket = argmax over [xR, -xR], Reformer's angular LSH) computed without building the concat and,
    at a small slice size, over slices of positions: identical buckets to the direct formula, ties included
    (all-zero rows tie everywhere and must take bucket 0, as argmax's first index does)."""
    m = make("lsh", *rand_qkv(h=2, d=16)[:2], bucket_size=4, n_hashes=3)
    monkeypatch.setattr(type(m), "hash_slice_elements", slice_elements)
    x = torch.randn(2, 2, 50, 16, generator=torch.Generator().manual_seed(3))
    x[:, :, :7] = 0.0
    nb = m.n_buckets(50)
    got = m._hash(x[:, :, :46], nb, 50)  # 46 real positions, padded to 50
    rot = torch.einsum("bhtd,dre->bhrte", x, m.rotations(nb, x.device, x.dtype))
    want = torch.cat([rot, -rot], dim=-1).argmax(dim=-1)
    want[..., 46:] = nb
    assert torch.equal(got, want)
    assert (got[..., :7] == 0).all()
