"""Linformer: the identity limit is dense attention (any Tk <= max_len, with padding), the approximate
regime matches its own formula, padding is exact, errors come before compute, E/F are trainable."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.methods.base import repeat_kv
from tests.helpers import DTYPES, assert_matches_reference, make, max_err, rand_qkv, reference


def _identity(q, k, n, **opts):
    return make("linformer", q, k, proj_len=n, max_len=n, init="identity", **opts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_head,share_kv", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("t,hkv", [(24, 4), (17, 2)])
def test_identity_limit_is_dense(dtype, per_head, share_kv, t, hkv):
    q, k, v = rand_qkv(tq=t, hkv=hkv, dtype=dtype, seed=t)
    out, probs = _identity(q, k, t, per_head=per_head, share_kv=share_kv)(q, k, v)
    assert probs is None and out.dtype == dtype
    err = assert_matches_reference(out, q, k, v)
    print(f"linformer identity T=max_len={t} {dtype}: max err {err:.2e}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tq", [19, 5])
def test_identity_limit_shorter_than_max_len_and_cross(dtype, tq):
    # E[:, :Tk] = rows of I; rows >= Tk read no key and are masked, so the limit stays exact for Tk < max_len
    q, k, v = rand_qkv(tq=tq, tk=19, hkv=2, dtype=dtype, seed=3)
    out, _ = _identity(q, k, 32)(q, k, v)
    assert_matches_reference(out, q, k, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_identity_limit_with_padding(dtype):
    q, k, v = rand_qkv(b=4, tq=15, hkv=2, dtype=dtype, seed=7)
    kpm = torch.ones(4, 15, dtype=torch.bool)
    kpm[0, 11:] = False  # right padding
    kpm[1, :4] = False  # left padding
    kpm[2, ::3] = False  # holes
    kpm[3] = False  # all padded
    out, _ = _identity(q, k, 16)(q, k, v, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert_matches_reference(out[:3], q[:3], k[:3], v[:3], key_padding_mask=kpm[:3])
    assert out[3].abs().max() == 0  # a row with no real key: zeros, not NaN


def _manual(method, q, k, v, kpm=None):
    """softmax(Q (E K)^T s)(F V) in fp64 by einsum, restricted to the real keys (what zero-padding means)."""
    tk, s = k.shape[-2], q.shape[-1] ** -0.5
    E = method.E.detach().double()[..., :tk]
    F = E if method.F is None else method.F.detach().double()[..., :tk]
    g = q.shape[1] // k.shape[1]
    q, k, v = q.detach().double(), repeat_kv(k.detach().double(), g), repeat_kv(v.detach().double(), g)
    if kpm is not None:
        k, v = k * kpm[:, None, :, None], v * kpm[:, None, :, None]
    eq = "hpt,bhtd->bhpd" if E.dim() == 3 else "pt,bhtd->bhpd"
    scores = torch.einsum("bhid,bhpd->bhip", q, torch.einsum(eq, E, k)) * s
    return torch.einsum("bhip,bhpd->bhid", scores.softmax(-1), torch.einsum(eq, F, v))


@pytest.mark.parametrize("per_head,share_kv", [(False, False), (True, False), (False, True)])
def test_random_projection_matches_formula(per_head, share_kv):
    torch.manual_seed(0)
    q, k, v = rand_qkv(tq=9, tk=21, seed=11)
    method = make("linformer", q, k, proj_len=8, max_len=40, per_head=per_head, share_kv=share_kv)
    out, _ = method(q, k, v)
    assert max_err(out, _manual(method, q, k, v)) < 1e-5
    assert max_err(out, reference(q, k, v)) > 1e-2  # it is an approximation, not dense in disguise


def test_random_projection_padding():
    # zeroing padded keys before projecting = using E[:, :L]: right-padded input == the unpadded input
    torch.manual_seed(0)
    q, k, v = rand_qkv(b=2, tq=20, hkv=2, seed=13)
    method = make("linformer", q, k, proj_len=6, max_len=32)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[0, 14:] = False
    kpm[1] = False
    out, _ = method(q, k, v, key_padding_mask=kpm)
    short, _ = method(q[:1, :, :14], k[:1, :, :14], v[:1, :, :14])
    torch.testing.assert_close(out[:1, :, :14], short, rtol=0, atol=1e-5)
    assert out[1].abs().max() == 0
    # garbage in padded keys/values changes nothing; the formula agrees for an arbitrary (left) padding
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 14:], v2[0, :, 14:] = 1e3, -1e3
    torch.testing.assert_close(method(q, k2, v2, key_padding_mask=kpm)[0], out, rtol=0, atol=1e-5)
    left = torch.ones(2, 20, dtype=torch.bool)
    left[:, :5] = False
    got = method(q, k, v, key_padding_mask=left)[0]
    assert max_err(got, _manual(method, q, k, v, left)) < 1e-5


def test_parameters_registered_and_trainable():
    torch.manual_seed(0)
    q, k, v = rand_qkv(tq=12, seed=1)
    method = make("linformer", q, k, proj_len=8, max_len=16, per_head=True)
    assert {n for n, _ in method.named_parameters()} == {"E", "F"}
    assert set(method.state_dict()) == {"E", "F"} and method.E.shape == (4, 8, 16)
    assert method.E.std().item() == pytest.approx(8**-0.5, rel=0.2)  # N(0, 1/proj_len)
    method(q, k, v)[0].square().sum().backward()
    for p in (method.E, method.F):
        assert p.grad is not None and p.grad[..., :12].abs().min() > 0  # every used entry learns
        assert p.grad[..., 12:].abs().max() == 0  # columns beyond T are padding
    shared = make("linformer", q, k, proj_len=8, max_len=16, share_kv=True)
    assert set(shared.state_dict()) == {"E"} and shared.E.shape == (8, 16)
    assert attnlab.registry.capabilities("linformer").trainable


def _no_compute(method):
    method._attend = lambda *a, **kw: pytest.fail("_attend ran for a request that should be refused")
    return method




def test_cached_row_check_follows_edits_of_E_and_the_length():
    """Without padding, whether every projected row reads a key is cached per (length, E's version): a shorter input
    that a row no longer reaches, or zeroing a row of E in place (as an optimizer step writes it), must mask that row
    (not leave it as a score-0 key), as the formula with the mask says."""
    torch.manual_seed(0)
    q, k, v = rand_qkv(tq=12, seed=3)
    method = make("linformer", q, k, proj_len=6, max_len=16)
    s = q.shape[-1] ** -0.5

    def manual(t):
        E, F = method.E.detach()[:, :t], method.F.detach()[:, :t]
        allowed = (E != 0).any(-1)  # (P,)
        scores = torch.einsum("bhid,bhpd->bhip", q[:, :, :t], torch.einsum("pt,bhtd->bhpd", E, k[:, :, :t])) * s
        p = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        return torch.einsum("bhip,bhpd->bhid", p, torch.einsum("pt,bhtd->bhpd", F, v[:, :, :t])), bool(allowed.all())

    method(q, k, v)  # caches "every row reads a key" at length 12
    with torch.no_grad():
        method.E[4, :8] = 0.0  # row 4 reads only keys 8..15
    for t, edit, all_read in ((12, None, True), (8, None, False), (12, None, True), (12, 2, False)):
        if edit is not None:
            with torch.no_grad():
                method.E[edit] = 0.0  # row 2 reads nothing at any length
        want, every = manual(t)
        assert every == all_read  # each step exercises what it says
        assert max_err(method(q[:, :, :t], k[:, :, :t], v[:, :, :t])[0], want) < 1e-5


def test_module_made_under_inference_mode():
    """E is then an inference tensor (no version counter): the row check runs every call instead of crashing."""
    q, k, v = rand_qkv(tq=12, seed=4)
    with torch.inference_mode():
        method = make("linformer", q, k, proj_len=6, max_len=16, init="normal")
        inside = method(q, k, v)[0]
    torch.testing.assert_close(method(q, k, v)[0], inside, rtol=0, atol=0)
    assert max_err(inside, _manual(method, q, k, v)) < 1e-5
