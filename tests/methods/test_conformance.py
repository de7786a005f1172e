"""The conformance suite: every registered method (built-in or plugin) runs every check its capabilities allow.

Each method owns what the checks need: `exact_limit(tq, tk)` (options under which it IS dense attention; None:
its own implied-matrix form, need_probs=True, is the reference) and `test_options(T)` (small, non-trivial,
causal-safe options). Per-method test files keep only what is special to a method.

Checks: exact limit vs an fp64 dense reference (fp32, bf16; odd lengths; padding) under flash-attention's
tolerance rule, causal no-leak, padded keys ignored and all-masked rows zeros, GQA, bf16 vs fp32, gradients,
state round trip through safetensors, bad options refused, the extras it declares (lse, column sums) against
dense, the kernel that ran visible on the module, refusals before compute, and determinism across two fresh
processes.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attnlab
from attnlab import registry
from attnlab.types import bad_option_values
from tests.helpers import (DTYPES, FLOOR, STATE_ROUNDING, assert_matches_reference, check_vs_quadratic, dense_error, grads,
                           max_err, rand_qkv)

METHODS = registry.list_methods()
T = 16  # exact-limit length (nystrom's exact pinv is ill-conditioned beyond a few dozen tokens in fp32)
D = 16


def cls(name):
    return registry.get(name)


def caps(name):
    return registry.capabilities(name)


def build(name, opts, h=4, hkv=2, seed=0):
    torch.manual_seed(seed)  # parameters a method initialises from the global RNG (none should)
    return attnlab.make(name, head_dim=D, num_heads=h, num_kv_heads=hkv if caps(name).gqa else None, **opts)


def qkv(name, tq=T, tk=None, dtype=torch.float32, seed=0, **kw):
    hkv = 2 if caps(name).gqa else 4
    tk = tq if (tk is None or not caps(name).cross) else tk
    return rand_qkv(b=2, h=4, hkv=hkv, tq=tq, tk=tk, d=D, dtype=dtype, seed=seed, **kw)


def causal_modes(name):
    return (False, True) if caps(name).causal else (False,)



# ---- exact limit -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tq", [T, 13])
@pytest.mark.parametrize("name", METHODS)
def test_exact_limit(name, tq, dtype):
    """In its exact limit the method is dense attention (tolerance rule vs fp64), with and without padding; a
    method without one equals its own implied-matrix form."""
    limit = cls(name).exact_limit(tq, tq)
    # without an exact limit the check compares two roundings of the same estimator; rfa's signed normalisers
    # amplify rounding by sum_j |p_ij| (about 30 at std 1), so those methods get std 0.5 inputs
    std = 1.0 if limit is not None else 0.5
    for causal in causal_modes(name):
        q, k, v = qkv(name, tq=tq, dtype=dtype, seed=tq, std=std)
        kpm = torch.ones(2, q.shape[2], dtype=torch.bool)
        kpm[1, -3:] = False
        for mask in ((None, kpm) if caps(name).padding else (None,)):
            limit = cls(name).exact_limit(q.shape[2], k.shape[2])
            if limit is None:
                m = build(name, cls(name).test_options(tq))
                out = m(q, k, v, causal=causal, key_padding_mask=mask).out
                check_vs_quadratic(out, q, k, v, m, causal=causal, key_padding_mask=mask)
                continue
            m = build(name, limit)
            out = m(q, k, v, causal=causal, key_padding_mask=mask).out
            assert out.dtype == dtype and out.shape == q.shape
            assert_matches_reference(out, q, k, v, causal=causal, key_padding_mask=mask)


@pytest.mark.parametrize("name", METHODS)
def test_single_token(name):
    q, k, v = qkv(name, tq=1)
    limit = cls(name).exact_limit(1, 1)
    m = build(name, limit if limit is not None else cls(name).test_options(1))
    for causal in causal_modes(name):
        out = m(q, k, v, causal=causal).out
        if limit is not None:
            assert_matches_reference(out, q, k, v, causal=causal)
        assert torch.isfinite(out).all() and out.shape == q.shape


# ---- causal ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in METHODS if caps(n).causal])
def test_causal_no_leak(name):
    """Changing every key, value and query after position t leaves the outputs at <= t bit-identical (up to 1e-6),
    and does change the later ones (else the check proves nothing)."""
    tq = 29
    q, k, v = qkv(name, tq=tq, seed=7)
    m = build(name, cls(name).test_options(tq))
    out = m(q, k, v, causal=True).out
    for t in (0, 7, 8, 20):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        g = torch.Generator().manual_seed(t)
        for x in (q2, k2, v2):
            x[:, :, t + 1:] = torch.randn(x[:, :, t + 1:].shape, generator=g) * 2
        out2 = m(q2, k2, v2, causal=True).out
        assert max_err(out[:, :, : t + 1], out2[:, :, : t + 1]) <= 1e-6, f"{name} leaks at t={t}"
        assert max_err(out[:, :, t + 1:], out2[:, :, t + 1:]) > 1e-3


# ---- padding, empty rows -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in METHODS if caps(n).padding])
def test_padded_keys_ignored_and_empty_rows_zero(name):
    """Whatever sits in padded key slots changes nothing; a batch row with every key padded returns exact zeros."""
    tq = 20
    for causal in causal_modes(name):
        q, k, v = qkv(name, tq=tq, seed=3)
        kpm = torch.ones(2, tq, dtype=torch.bool)
        kpm[0, 13:] = False
        kpm[1, :] = False  # no real key at all
        m = build(name, cls(name).test_options(tq))
        pad = ~kpm[:, None, :, None]
        out = m(q, k.masked_fill(pad, 0.0), v.masked_fill(pad, 0.0), causal=causal, key_padding_mask=kpm).out
        junk = m(q, k.masked_fill(pad, 7.0), v.masked_fill(pad, 1e3), causal=causal, key_padding_mask=kpm).out
        assert torch.isfinite(out).all() and torch.isfinite(junk).all()
        assert (out[1] == 0).all(), f"{name}: a row with no real key must be zeros"
        assert max_err(out, junk) <= 1e-5, f"{name}: padded keys changed the output"


ANCHORED = [n for n in METHODS if caps(n).padding and build(n, cls(n).test_options(20)).anchored()]


def test_methods_reading_absolute_positions_are_anchored():
    assert {"window", "block_sparse", "global_sparse", "learned_mask"} <= set(ANCHORED)  # (window: its test sinks)


@pytest.mark.parametrize("name", ANCHORED)
def test_left_padded_row_equals_the_row_alone(name):
    """A method that reads absolute positions (sinks, a block grid) counts them from each row's first real key: a
    left-padded row's real queries give what the row alone gives, values and gradients. Dropped (zeros): causal, the
    queries before the row's first key; self-attention not causal, the padded tokens' own queries; none otherwise.
    Decoding shapes too (Tq < Tk, and queries partly before the first real key), and Tq > Tk where allowed."""
    shapes = [(20, 20, 7)] + ([(3, 20, 7), (10, 20, 15), (20, 12, 2)] if caps(name).cross else [])
    for causal in causal_modes(name):
        for tq, tk, pad in shapes:
            q, k, v = qkv(name, tq=tq, tk=tk, seed=6)
            kpm = torch.ones(2, tk, dtype=torch.bool)
            kpm[0, :pad] = False
            m = build(name, cls(name).test_options(20))
            q, k, v = (x.requires_grad_() for x in (q, k, v))
            out = m(q, k, v, causal=causal, key_padding_mask=kpm).out
            w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
            (out * w).sum().backward()
            drop = max(0, pad - (tk - tq)) if causal else (pad if tq == tk else 0)
            a, b, c = (x.detach()[:1].clone().requires_grad_() for x in (q[:, :, drop:], k[:, :, pad:], v[:, :, pad:]))
            alone = m(a, b, c, causal=causal).out
            (alone * w[:1, :, drop:]).sum().backward()
            case = (name, causal, tq, tk, pad)
            assert (out[0, :, :drop] == 0).all(), case
            assert max_err(out[0, :, drop:], alone[0]) <= 1e-5, case
            assert max_err(q.grad[0, :, drop:], a.grad[0]) <= 1e-5 and max_err(k.grad[0, :, pad:], b.grad[0]) <= 1e-5, case
            assert max_err(v.grad[0, :, pad:], c.grad[0]) <= 1e-5 and k.grad[0, :, :pad].abs().max() == 0, case
    ex = caps(name).extras
    if ex and torch.float64 in caps(name).dtypes:  # the extras keep the kernels' dtype (fp64 in, fp64 lse)
        q, k, v = qkv(name, tq=20, dtype=torch.float64, seed=7)
        kpm = torch.ones(2, 20, dtype=torch.bool)
        kpm[0, :7] = False
        r = build(name, cls(name).test_options(20))(q, k, v, causal=True, key_padding_mask=kpm,
                                                    need_lse="lse" in ex, need_col_sums="col_sums" in ex)
        assert all(x is None or x.dtype == torch.float64 for x in (r.lse, r.col_sums))


@pytest.mark.parametrize("name", ANCHORED[:1])
def test_left_padding_inside_a_compiled_graph_counts_from_key_0(name, monkeypatch):
    """Where the host cannot read the padding (a CUDA-graph capture, a torch.compile trace) the graph must not depend
    on it: the call runs uncropped, as before 2026-12-05, with a warning."""
    import attnlab.methods.base as base

    q, k, v = qkv(name, tq=20, seed=6)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[0, :7] = False
    m = build(name, cls(name).test_options(20))
    monkeypatch.setattr(base, "_warned_capture", False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with pytest.warns(UserWarning, match="count from key 0"):
        out = m(q, k, v, causal=True, key_padding_mask=kpm).out
    want = m._attend(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True, key_padding_mask=kpm,
                     attn_mask=None, scale=D ** -0.5, need_probs=False)
    assert max_err(out, want[0]) <= 1e-6


@pytest.mark.parametrize("name", [n for n in METHODS if caps(n).causal and caps(n).cross])
def test_causal_rows_before_the_first_key_are_zero(name):
    q, k, v = qkv(name, tq=12, tk=7)
    out = build(name, cls(name).test_options(12))(q, k, v, causal=True).out
    assert torch.isfinite(out).all()
    assert (out[:, :, :5] == 0).all()  # bottom-right: queries 0..4 sit before key 0


# ---- GQA, dtypes, gradients --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in METHODS if caps(n).gqa])
def test_gqa_equals_repeated_kv(name):
    for causal in causal_modes(name):
        q, k, v = qkv(name, tq=18, seed=4)
        a = build(name, cls(name).test_options(18))(q, k, v, causal=causal).out
        full = attnlab.make(name, head_dim=D, num_heads=4, **cls(name).test_options(18))
        full.load_state_dict(build(name, cls(name).test_options(18)).state_dict())
        b = full(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=causal).out
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", METHODS)
def test_bf16_close_to_fp32(name):
    """bf16 inputs: finite, the inputs' dtype, and within 4x dense's own bf16 error of the same module in fp32
    (random-feature estimates are rougher functions of q, k than softmax; measured up to ~2.4x) plus two bf16
    roundings of the largest output (linformer's projected values make outputs ~3x dense's: measured 0.027 at
    max |out| 2.6, where one bf16 ulp is 0.0156)."""
    for causal in causal_modes(name):
        q, k, v = qkv(name, tq=24, seed=5, std=0.5)
        m = build(name, cls(name).test_options(24))
        ref32 = m(q, k, v, causal=causal).out
        q16, k16, v16 = (x.bfloat16() for x in (q, k, v))
        out16 = m(q16, k16, v16, causal=causal).out
        assert out16.dtype == torch.bfloat16 and torch.isfinite(out16).all()
        bound = (4 * dense_error(q16, k16, v16, causal=causal) + FLOOR[torch.bfloat16]
                 + STATE_ROUNDING[torch.bfloat16] * ref32.abs().max().item())
        assert max_err(out16, ref32) <= bound, f"{name} causal={causal}"


@pytest.mark.parametrize("name", METHODS)
def test_gradients(name):
    """fp64 gradients of the inputs equal the reference's (dense in the exact limit, else the method's own
    implied-matrix form); fp32 gradients are finite; trainable parameters receive a gradient."""
    tq = 11
    q, k, v = qkv(name, tq=tq, dtype=torch.float64, seed=6)
    for causal in causal_modes(name):
        limit = cls(name).exact_limit(tq, tq)
        m = build(name, limit if limit is not None else cls(name).test_options(tq)).double()
        got = grads(lambda a, b, c: m(a, b, c, causal=causal).out, q, k, v)
        if limit is not None:
            dense = build("dense", {}).double() if caps(name).gqa else attnlab.make("dense", head_dim=D, num_heads=4)
            want = grads(lambda a, b, c: dense(a, b, c, causal=causal).out, q, k, v)
        else:
            want = grads(lambda a, b, c: m(a, b, c, causal=causal, need_probs=True).out, q, k, v)
        for g, w in zip(got, want):
            assert torch.isfinite(g).all()
            torch.testing.assert_close(g, w, atol=1e-7, rtol=1e-6)
        m32 = build(name, cls(name).test_options(tq))
        q32, k32, v32 = (x.float().requires_grad_(True) for x in (q, k, v))
        m32(q32, k32, v32, causal=causal).out.pow(2).sum().backward()
        assert all(torch.isfinite(x.grad).all() for x in (q32, k32, v32))
        for pname, p in m32.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{name}.{pname} got no gradient"


# ---- state, options, extras, kernels, refusals -------------------------------------------------------------------
@pytest.mark.parametrize("name", METHODS)
def test_state_round_trip_through_safetensors(name, tmp_path):
    """Parameters and buffers are all the state: saved with safetensors (no pickle) into a fresh instance built
    from the same options (as attnlab.load rebuilds from the saved spec) whose parameters differ, the output is
    bit-equal. (Drawn state that changes after construction, redrawn features, is checked per method.)"""
    from safetensors.torch import load_file, save_file

    opts = cls(name).test_options(T)
    a = build(name, opts)
    for p in a.parameters():  # a "trained" state, not the init
        p.data.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.01)
    state = {k: v.contiguous() for k, v in a.state_dict().items()}
    save_file({k: v.clone() for k, v in state.items()}, str(tmp_path / "m.safetensors"))
    b = build(name, opts, seed=99)
    for p in b.parameters():
        p.data.add_(1.0)
    b.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    q, k, v = qkv(name)
    for causal in causal_modes(name):
        assert torch.equal(a(q, k, v, causal=causal).out, b(q, k, v, causal=causal).out)


@pytest.mark.parametrize("name", METHODS)
def test_bad_options_refused(name):
    with pytest.raises(attnlab.OptionError, match="valid options"):
        attnlab.make(name, head_dim=D, num_heads=4, no_such_option=1)
    for opt, value in bad_option_values(cls(name).Options):
        with pytest.raises(attnlab.OptionError, match=opt):
            attnlab.make(name, head_dim=D, num_heads=4, **{**cls(name).test_options(T), opt: value})


def anchored_mask(pattern, tq, tk, causal, kpm):
    """Bool[B|1, H|1, Tq, Tk]: `pattern` with each row's positions counted from its first real key (kpm None: from
    key 0). Query i sits at position i + Tk - Tq; the queries before a row's first real key see nothing."""
    if kpm is None:
        return pattern.dense(tq, tk, causal)[None]
    heads = pattern.num_heads if pattern.per_head else 1
    out = torch.zeros(kpm.shape[0], heads, tq, tk, dtype=torch.bool)
    for b, row in enumerate(kpm):
        lead = int(row.nonzero()[0]) if row.any() else tk
        drop = min(tq, max(0, lead - (tk - tq)))
        if drop < tq:
            out[b, :, drop:, lead:] = pattern.dense(tq - drop, tk - lead, causal)
    return out


def _extras_reference(name, m, q, k, v, causal, kpm):
    """(lse, col_sums) from dense maths under the mask the method implies: its pattern for sparse methods, none
    for exact ones, and its own implied-matrix (need_probs) form for the rest."""
    dense = attnlab.make("dense", head_dim=D, num_heads=4)
    groups = 4 // k.shape[1]
    kk, vv = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    pattern = getattr(m, "pattern", None)
    if pattern is not None:
        allowed = anchored_mask(pattern, q.shape[2], k.shape[2], causal, kpm if m.anchored() else None)
        r = dense(q, kk, vv, causal=causal, key_padding_mask=kpm, attn_mask=allowed, need_lse=True, need_col_sums=True)
        return r.lse, r.col_sums
    if name in ("dense", "sdpa") or cls(name).exact_limit(q.shape[2], k.shape[2]) == {}:
        r = dense(q, kk, vv, causal=causal, key_padding_mask=kpm, need_lse=True, need_col_sums=True)
        return r.lse, r.col_sums
    r = m(q, k, v, causal=causal, key_padding_mask=kpm, need_probs=True, need_lse="lse" in caps(name).extras)
    probs = r.probs.double()
    rows = probs * kpm[:, None, :, None] if kpm is not None and q.shape[2] == k.shape[2] else probs
    return r.lse, rows.sum(-2)


@pytest.mark.parametrize("name", [n for n in METHODS if caps(n).extras])
def test_declared_extras_match_dense(name):
    """lse and column sums, computed blockwise by the method, equal dense maths (fp32 and bf16 tolerances)."""
    for dtype in DTYPES:
        for causal in causal_modes(name):
            q, k, v = qkv(name, tq=21, dtype=dtype, seed=8)
            kpm = torch.ones(2, 21, dtype=torch.bool)
            kpm[0, :4] = False
            m = build(name, cls(name).test_options(21))
            ex = caps(name).extras
            r = m(q, k, v, causal=causal, key_padding_mask=kpm, need_lse="lse" in ex, need_col_sums="col_sums" in ex)
            lse_ref, col_ref = _extras_reference(name, m, q, k, v, causal, kpm)
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            if "lse" in ex:
                assert r.lse.shape == q.shape[:3] and r.lse.dtype == torch.float32
                fin = torch.isfinite(lse_ref)
                assert torch.equal(torch.isfinite(r.lse), fin)
                assert max_err(r.lse[fin], lse_ref[fin]) <= tol * 10, (name, dtype, causal)
            if "col_sums" in ex:
                assert r.col_sums.shape == k.shape[:2][:1] + (4, k.shape[2])
                assert max_err(r.col_sums, col_ref) <= tol * 21, (name, dtype, causal)
                # every real query row that sees a key contributes exactly 1
                assert abs(r.col_sums.sum().item() - col_ref.sum().item()) <= 1e-3 * col_ref.sum().item()


@pytest.mark.parametrize("name", [n for n in METHODS if set(caps(n).extras) != {"lse", "col_sums"}])
def test_undeclared_extras_refused_before_compute(name, monkeypatch):
    m = build(name, cls(name).test_options(T))
    monkeypatch.setattr(type(m), "_attend", lambda *a, **kw: pytest.fail("computed before refusing"))
    q, k, v = qkv(name)
    missing = [e for e in ("lse", "col_sums") if e not in caps(name).extras]
    with pytest.raises(attnlab.UnsupportedError, match=f"cannot compute {missing[0]}"):
        m(q, k, v, **{f"need_{missing[0]}": True})


@pytest.mark.parametrize("name", METHODS)
def test_refusals_before_compute(name, monkeypatch):
    m = build(name, cls(name).test_options(T))
    monkeypatch.setattr(type(m), "_attend", lambda *a, **kw: pytest.fail("computed before refusing"))
    q, k, v = qkv(name)
    if not caps(name).causal:
        with pytest.raises(attnlab.UnsupportedError, match="causal"):
            m(q, k, v, causal=True)
    if not caps(name).probs:
        with pytest.raises(attnlab.UnsupportedError, match="probabilities"):
            m(q, k, v, need_probs=True)
    if not caps(name).attn_mask:
        with pytest.raises(attnlab.UnsupportedError, match="attn_mask"):
            m(q, k, v, attn_mask=torch.ones(T, T, dtype=torch.bool))
    if not caps(name).cross:
        q2, k2, v2 = rand_qkv(b=2, h=4, hkv=k.shape[1], tq=5, tk=9, d=D)
        with pytest.raises(attnlab.UnsupportedError, match="Tq == Tk"):
            m(q2, k2, v2)


@pytest.mark.parametrize("name", METHODS)
def test_kernel_that_ran_is_visible(name):
    m = build(name, cls(name).test_options(T))
    assert m.kernel is None
    q, k, v = qkv(name)
    m(q, k, v)
    assert isinstance(m.kernel, str) and m.kernel


@pytest.mark.parametrize("name", METHODS)
def test_defaults_are_valid_options(name):
    for t in (64, 512, 4096, 65536):
        extra = cls(name).test_options(t) if cls(name).requires else {}  # the data it is built from
        attnlab.make(name, head_dim=D, num_heads=4, **{**extra, **cls(name).defaults(t)})
        assert cls(name).test_options(t) is not None


# ---- determinism across fresh processes ------------------------------------------------------------------------
_DIGEST_SCRIPT = textwrap.dedent("""
    import hashlib, json, sys, torch, attnlab
    from attnlab import registry
    out = {}
    for name in registry.list_methods():
        cls, caps = registry.get(name), registry.capabilities(name)
        g = torch.Generator().manual_seed(0)
        hkv = 2 if caps.gqa else 4
        q = torch.randn(2, 4, 24, 16, generator=g); k = torch.randn(2, hkv, 24, 16, generator=g); v = torch.randn(2, hkv, 24, 16, generator=g)
        opts = {**(cls.test_options(24) if cls.requires else {}), **cls.defaults(24)}
        m = attnlab.make(name, head_dim=16, num_heads=4, num_kv_heads=hkv if caps.gqa else None, **opts)
        with torch.no_grad():
            o = m(q, k, v, causal=caps.causal).out
        out[name] = hashlib.sha256(o.numpy().tobytes()).hexdigest()
    json.dump(out, sys.stdout)
""")


@pytest.fixture(scope="module")
def fresh_process_digests():
    """Each method's output digest (its default options, seeded inputs) from two fresh Python processes."""
    runs = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-c", _DIGEST_SCRIPT], capture_output=True, text=True, timeout=300,
                             cwd=Path(__file__).resolve().parents[2])
        assert res.returncode == 0, res.stderr[-2000:]
        runs.append(json.loads(res.stdout))
    return runs


@pytest.mark.parametrize("name", METHODS)
def test_same_seed_same_output_in_fresh_processes(name, fresh_process_digests):
    a, b = fresh_process_digests
    assert name in a, f"{name} is not registered in a fresh process (discovery)"
    assert a[name] == b[name], f"{name}: two fresh processes gave different outputs"
