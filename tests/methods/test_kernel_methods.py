"""What is special to the kernelised methods (linear, performer, rfa; their shared core is `ops.linear`, their
feature maps `attnlab.feature_maps`). The conformance suite covers the rest (quadratic-form limit, causal,
padding, GQA, bf16, gradients, state, options, determinism).

Each method's implied matrix is checked against its paper's formula written out independently in fp64; the
random-feature estimators converge to softmax as features grow; the chunked and carried causal forms equal
the quadratic form for every chunking; one huge future key changes nothing before it; redrawn features
survive save and load.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnlab
from attnlab.feature_maps import fourier_features
from tests.helpers import check_vs_quadratic, make, max_err, rand_qkv, reference

RANDOM = ["performer", "rfa"]
KERNEL = ["linear", *RANDOM]
# rfa's trig features make the implied weights signed: rounding is amplified by sum_j |p_ij| (about 30 at std 1
# with 32 features), so checks that compare two roundings use std 0.5 inputs, where that is a few units.
STD = {"linear": 1.0, "performer": 1.0, "rfa": 0.5}


def opts(name, **kw):
    return {"num_features": 32, **kw} if name in RANDOM else kw


# ---- the papers' formulas, independently ----------------------------------------------------------------------
def test_linear_is_the_paper_formula():
    q, k, v = rand_qkv(b=1, h=2, tq=5, tk=7, d=4, dtype=torch.float64)
    m = make("linear", q, k)
    out, probs = m(q, k, v, causal=True, need_probs=True)
    s = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)  # (B, H, 5, 7)
    s = s.masked_fill(~torch.ones(5, 7, dtype=torch.bool).tril(2), 0.0)  # bottom-right: query i sees j <= i + 2
    want = s / s.sum(-1, keepdim=True)
    torch.testing.assert_close(probs, want)
    torch.testing.assert_close(out, want @ v)
    torch.testing.assert_close(m(q, k, v, causal=True).out, want @ v)


def test_performer_is_the_favor_formula():
    # large-norm keys (std 3) stress the stabilisers: a per-key max not compensated by the key log-scale (it does
    # NOT cancel alone) or an overflow would fail this in fp32
    q, k, v = rand_qkv(b=1, h=2, tq=6, tk=9, d=8, std=3.0, seed=1)
    m = make("performer", q, k, num_features=32)
    w, root = m.features.double(), 8 ** -0.25
    phi = lambda x: torch.exp((x.double() * root) @ w.T - (x.double() * root).pow(2).sum(-1, keepdim=True) / 2)  # noqa: E731
    s = (phi(q) @ phi(k).transpose(-1, -2)).masked_fill(~torch.ones(6, 9, dtype=torch.bool).tril(3), 0.0)
    want = s / s.sum(-1, keepdim=True)
    out, probs = m(q, k, v, causal=True, need_probs=True)
    torch.testing.assert_close(probs.double(), want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(m(q, k, v, causal=True).out.double(), want @ v.double(), atol=1e-4, rtol=1e-4)


def test_rfa_is_the_fourier_formula():
    # phi(x) = [sin Wx, cos Wx] / sqrt(m), keys weighted by exp(|k'|^2 / 2); std 1.5 keys make that weight span
    # orders of magnitude, so the stabilisers (the core's running max over the visible keys) are exercised
    q, k, v = rand_qkv(b=1, h=2, tq=6, tk=9, d=8, std=1.5, seed=1)
    m = make("rfa", q, k, num_features=32)
    w, root = m.features.double(), 8 ** -0.25
    trig = lambda x: torch.cat([torch.sin(x @ w.T), torch.cos(x @ w.T)], -1) / 32 ** 0.5  # noqa: E731
    qs, ks = q.double() * root, k.double() * root
    s = trig(qs) @ (trig(ks) * torch.exp(ks.pow(2).sum(-1, keepdim=True) / 2)).transpose(-1, -2)
    s = s.masked_fill(~torch.ones(6, 9, dtype=torch.bool).tril(3), 0.0)
    want = s / s.sum(-1, keepdim=True)
    out, probs = m(q, k, v, causal=True, need_probs=True)
    torch.testing.assert_close(probs.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m(q, k, v, causal=True).out.double(), want @ v.double(), atol=1e-4, rtol=1e-4)


def test_rfa_kernel_is_unbiased():
    # E[phi(x).phi(y)] = exp(-|x - y|^2 / 2): checked with many frequencies on a few pairs
    m = make("rfa", *rand_qkv(b=1, h=1, tq=2, d=8)[:2], num_features=20000)
    x, y = (torch.randn(4, 8, generator=torch.Generator().manual_seed(i)) * 0.4 for i in (1, 2))
    phi = [fourier_features(t, m.features, 0.5, m.opts.num_features ** -0.5)[0] for t in (x, y)]  # scale 1
    torch.testing.assert_close((phi[0] * phi[1]).sum(-1), torch.exp(-(x - y).pow(2).sum(-1) / 2), atol=2e-2, rtol=0)


def test_rfa_normalize_is_the_papers_unit_form():
    """normalize=True: phi(x) = [sin(W u), cos(W u)] / sqrt(m) with u = sigma_h o x / |x| per head, no key weight.
    The implied matrix equals that formula (fp64, per-head sigma); sigma is a parameter that gets a gradient and
    survives save and load; the plain map's matrix is a different function on the same inputs."""
    q, k, v = rand_qkv(b=1, h=2, tq=6, tk=9, d=8, std=1.5, seed=1, dtype=torch.float64)
    m = make("rfa", q, k, num_features=32, normalize=True, sigma=1.3).double()
    with torch.no_grad():
        m.feature_map.sigma[1].mul_(torch.linspace(0.5, 2.0, 8, dtype=torch.float64))  # per head, per dim
    w, sig = m.features.double(), m.feature_map.sigma.detach()

    def phi(x):
        u = x / x.norm(dim=-1, keepdim=True) * sig[None, :, None, :]
        return torch.cat([torch.sin(u @ w.T), torch.cos(u @ w.T)], -1) / 32 ** 0.5

    s = (phi(q) @ phi(k).transpose(-1, -2)).masked_fill(~torch.ones(6, 9, dtype=torch.bool).tril(3), 0.0)
    want = s / s.sum(-1, keepdim=True)
    out, probs = m(q, k, v, causal=True, need_probs=True)
    torch.testing.assert_close(probs, want)
    torch.testing.assert_close(m(q, k, v, causal=True).out, want @ v)
    m(q, k, v, causal=True).out.square().sum().backward()
    assert m.feature_map.sigma.grad is not None and m.feature_map.sigma.grad.abs().sum() > 0
    plain = make("rfa", q, k, num_features=32).double()
    assert not torch.allclose(plain(q, k, v, causal=True, need_probs=True).probs, want, atol=1e-2)
    fresh = make("rfa", q, k, num_features=32, normalize=True).double()
    fresh.load_state_dict(m.state_dict())
    torch.testing.assert_close(fresh(q, k, v, causal=True).out, m(q, k, v, causal=True).out, rtol=0, atol=0)


def test_rfa_normalize_converges_to_cosine_softmax():
    """Exact limit of the unit form with a constant sigma = c: softmax(c^2 q^.k^) over unit q^, k^ (the causal
    dense reference); the error falls as features grow (mean over three draws: 1/sqrt(m))."""
    q, k, v = rand_qkv(b=1, h=2, tq=10, d=8, seed=3, dtype=torch.float64)
    qh, kh = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    want = F.scaled_dot_product_attention(qh, kh, v, is_causal=True, scale=1.5 ** 2)

    def err(m_features):
        return sum(max_err(make("rfa", q, k, num_features=m_features, normalize=True, sigma=1.5, seed=s).double()(
            q, k, v, causal=True).out.detach(), want) for s in range(3)) / 3

    few, many = err(500), err(50000)
    assert many < 0.06 and many < few / 3


def test_performer_features_are_orthogonal_blocks():
    m = make("performer", *rand_qkv(b=1, h=1, tq=2, d=8)[:2], num_features=20)
    w = m.features.double()  # (20, 8): blocks of 8, 8, 4 rows
    assert w.shape == (20, 8)
    for blk in (w[:8], w[8:16], w[16:]):
        g = blk @ blk.T
        assert (g - torch.diag(g.diagonal())).abs().max() < 1e-5  # orthogonal rows within a block


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", RANDOM)
def test_estimator_converges_to_softmax(name, causal):
    """error ~ 1/sqrt(m): 64 -> 4096 features is 8x in theory; demand 4x (mean abs error, 3 seeds)."""
    def mean_err(m_feats):
        errs = []
        for s in (0, 1, 2):
            q, k, v = rand_qkv(b=2, h=2, tq=32, d=16, seed=s, std=0.3)
            out = make(name, q, k, num_features=m_feats, seed=s)(q, k, v, causal=causal).out
            errs.append((out.double() - reference(q, k, v, causal=causal)).abs().mean().item())
        return sum(errs) / len(errs)

    e64, e4096 = mean_err(64), mean_err(4096)
    print(f"{name} causal={causal}: mean abs err m=64 {e64:.2e}, m=4096 {e4096:.2e}, ratio {e64 / e4096:.1f}")
    assert e64 >= 4 * e4096 and e4096 < 5e-3


# ---- the chunked / carried forms equal the quadratic form -----------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tq,tk,chunk", [(32, 32, 8), (33, 33, 8), (1, 1, 4), (5, 21, 4), (21, 5, 4), (45, 45, 16)])
@pytest.mark.parametrize("name", KERNEL)
def test_every_chunking_and_cross_length_matches_quadratic(name, dtype, causal, tq, tk, chunk):
    """Causal with Tq != Tk is bottom-right aligned (decoding); Tq > Tk leaves the first rows with no key."""
    q, k, v = rand_qkv(b=2, h=2, tq=tq, tk=tk, d=8, dtype=dtype, seed=tq + tk, std=STD[name])
    m = make(name, q, k, **opts(name, chunk_size=chunk, backend="eager"))
    out = m(q, k, v, causal=causal).out
    assert out.dtype == dtype and out.shape == q.shape
    check_vs_quadratic(out, q, k, v, m, causal=causal)
    if causal and tq > tk:
        assert (out[:, :, : tq - tk] == 0).all()


@pytest.mark.parametrize("feature_map", ["elu", "relu"])
def test_linear_causal_earlier_outputs_bit_identical_when_future_changes(feature_map):
    # Exact, not approximately: an exclusive prefix computed as (inclusive - own chunk) rounds differently
    # when a later chunk changes (it leaked ~1e-7 on CUDA); the shifted inclusive prefix does not.
    q, k, v = rand_qkv(b=2, h=2, tq=96, d=8, seed=5)
    m = make("linear", q, k, feature_map=feature_map, chunk_size=8)
    out = m(q, k, v, causal=True).out
    for t0 in (7, 8, 30, 64):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t0 + 1:] = k2[:, :, t0 + 1:] * 3.7 + 1.3
        v2[:, :, t0 + 1:] = v2[:, :, t0 + 1:] * -2.1 + 0.7
        assert torch.equal(out[:, :, : t0 + 1], m(q, k2, v2, causal=True).out[:, :, : t0 + 1]), t0


@pytest.mark.parametrize("tq,chunk", [(40, 8), (40, 64), (27, 8)])
@pytest.mark.parametrize("name,mode", [("performer", "feature"), ("performer", "x4"), ("rfa", "x6"), ("rfa", "x1.5")])
def test_one_large_future_key_changes_nothing_before_it(name, mode, tq, chunk):
    """Strict: changing ONE later key must not change outputs at <= t beyond fp32 rounding (1e-6 relative), in
    the chunked and the quadratic forms. performer "feature": the key k' = w_f of the largest-norm random
    feature maximises w.k' - |k'|^2/2; rfa "xF": the key weight exp(|k'|^2/2) is unbounded. With a stabiliser
    over ALL keys the earlier keys' weights underflowed (measured before the fix: outputs moved by up to 0.7x
    their size for performer, 0.02-5x for rfa). tq < 40: a prefix of keys before the first query; chunk 64:
    one chunk (the intra-chunk form only)."""
    d = 32 if name == "performer" else 16
    q, k, v = rand_qkv(b=2, h=2, tq=tq, tk=40, d=d, seed=11)
    m = make(name, q, k, num_features=128 if name == "performer" else 64, chunk_size=chunk)
    w = m.features[m.features.norm(dim=1).argmax()]

    def perturb(k2, p):
        if mode == "feature":
            k2[:, :, p] = w * d ** 0.25  # k' = k sqrt(scale) = w
        else:
            k2[:, :, p] *= float(mode[1:])
        return k2

    tk, worst, moved = 40, 0.0, float("inf")
    for need_probs in (False, True):
        out = m(q, k, v, causal=True, need_probs=need_probs).out
        for t in (3, 8, 17, 30):
            for p in (t + 1, tk - 1):
                out2 = m(q, perturb(k.clone(), p), v, causal=True, need_probs=need_probs).out
                rows = t + 1 - (tk - tq)  # query rows at key positions <= t
                if rows > 0:
                    past = out[:, :, :rows]
                    worst = max(worst, max_err(past, out2[:, :, :rows]) / past.abs().max().item())
                moved = min(moved, max_err(out[:, :, p - (tk - tq)], out2[:, :, p - (tk - tq)]))
    print(f"{name} {mode} tq={tq} chunk={chunk}: max relative change at <= t {worst:.2e}, at p {moved:.2e}")
    assert worst <= 1e-6
    assert moved > 1e-3  # the perturbation does reach the perturbed position


@pytest.mark.parametrize("group", [1, 2, 3, 32])
@pytest.mark.parametrize("name", RANDOM)
def test_two_level_carry_matches_quadratic_form(monkeypatch, name, group):
    """The causal carry over many chunk groups (group=1: one chunk a group, fully sequential) equals the O(T^2)
    form in fp64, and a huge future key still changes nothing before it."""
    from attnlab.ops import linear as core

    monkeypatch.setattr(core, "_GROUP", group)
    q, k, v = rand_qkv(b=1, h=2, tq=41, d=8, dtype=torch.float64, seed=7, std=0.5)
    m = make(name, q, k, num_features=16, chunk_size=4)
    out = m(q, k, v, causal=True).out
    assert torch.allclose(out, m(q, k, v, causal=True, need_probs=True).probs @ v, atol=1e-10)
    k2 = k.clone()
    k2[:, :, 30] *= 8.0
    assert torch.equal(out[:, :, :30], m(q, k2, v, causal=True).out[:, :, :30])


# ---- method specifics ---------------------------------------------------------------------------------------
def test_linear_scale_is_ignored_and_relu_zero_normaliser_gives_zeros():
    q, k, v = rand_qkv(b=1, h=2, tq=9, d=8)
    m = make("linear", q, k)
    torch.testing.assert_close(m(q, k, v, scale=0.01).out, m(q, k, v, scale=3.0).out, atol=0, rtol=0)
    q = -q.abs()  # all relu features of q are 0: normaliser exactly 0
    assert (make("linear", q, k, feature_map="relu")(q, k, v).out == 0).all()


@pytest.mark.parametrize("name", RANDOM)
def test_redraw(name):
    q, k, v = rand_qkv(b=1, h=2, tq=8, d=8)
    m = make(name, q, k, num_features=16, redraw=True).train()
    w0 = m.features.clone()
    o1 = m(q, k, v).out
    w1 = m.features.clone()
    o2 = m(q, k, v).out
    assert not torch.equal(w0, w1) and not torch.equal(w1, m.features) and not torch.equal(o1, o2)
    m.eval()
    w2 = m.features.clone()
    m(q, k, v)
    assert torch.equal(w2, m.features)  # eval: fixed features
    fixed = make(name, q, k, num_features=16).train()
    w3 = fixed.features.clone()
    fixed(q, k, v)
    assert torch.equal(w3, fixed.features)  # redraw=False: fixed even in training
    m2 = make(name, q, k, num_features=16, redraw=True).train()  # one seed, one stream
    m2(q, k, v)
    assert torch.equal(m2.features, w1)


@pytest.mark.parametrize("name", RANDOM)
def test_redrawn_features_and_the_stream_survive_save_and_load(name, tmp_path):
    """After redraws the features are no longer the seed's: they (and where the stream continues) are state."""
    from safetensors.torch import load_file, save_file

    q, k, v = rand_qkv(b=1, h=2, tq=8, d=8)
    a = make(name, q, k, num_features=16, redraw=True).train()
    for _ in range(3):
        a(q, k, v)
    save_file({n: t.contiguous() for n, t in a.state_dict().items()}, str(tmp_path / "a.safetensors"))
    b = make(name, q, k, num_features=16, redraw=True)
    b.load_state_dict(load_file(str(tmp_path / "a.safetensors")))
    a.eval(), b.eval()
    assert torch.equal(a(q, k, v).out, b(q, k, v).out)
    a.train(), b.train()
    assert torch.equal(a(q, k, v).out, b(q, k, v).out)  # the next redraw is the same draw


def test_random_features_differ_by_seed():
    q, k, _ = rand_qkv(b=1, h=2, tq=2, d=8)
    for name in RANDOM:
        a, b, c = (make(name, q, k, num_features=16, seed=s) for s in (3, 3, 4))
        assert torch.equal(a.features, b.features) and not torch.equal(a.features, c.features)


@pytest.mark.parametrize("name", KERNEL)
def test_backend_choice_is_visible_and_refused_where_it_cannot_run(name, monkeypatch):
    import attnlab.ops.linear as core

    q, k, v = rand_qkv(b=1, h=2, tq=20, d=16)
    m = make(name, q, k, **opts(name))
    m(q, k, v, causal=True)
    assert m.kernel == "chunked"  # auto on CPU: the PyTorch form, eagerly
    m(q, k, v, causal=False)
    assert m.kernel == "one-pass"
    m(q, k, v, causal=True, need_probs=True)
    assert m.kernel == "quadratic"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as on a machine without the interpreter
    tri = make(name, q, k, **opts(name, backend="triton"))
    with pytest.raises(attnlab.UnsupportedError, match="backend='triton'.*CUDA"):
        tri(q, k, v, causal=True)
    with pytest.raises(attnlab.UnsupportedError, match="causal form"):
        tri(q, k, v, causal=False)
    assert core.triton_unsupported_reasons(None, causal=True, tq=4, tk=4, head_dim=8, feature_dim=32)


def test_a_fused_map_compiles_for_its_variants_without_falling_back(monkeypatch):
    """hedgehog's map compiled in a training run meets grad on and off, inputs requiring grad or not, batch 1 and
    others, fp32 and bf16: more than dynamo's default 8 variants, after which it ran eagerly (seen on the H200).
    The first compile raises the limit; the 16 variants here compile without hitting it."""
    import itertools

    import torch._dynamo

    from attnlab.feature_maps import hedgehog_features
    from attnlab.ops import fused

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    monkeypatch.setattr(hedgehog_features, "_compiled", None)
    hits = []
    monkeypatch.setattr(torch._dynamo.convert_frame, "log", type("L", (), {
        "warning": lambda *a, **k: hits.append(a), "debug": lambda *a, **k: None, "info": lambda *a, **k: None,
        "isEnabledFor": lambda *a: False})())
    w = torch.randn(2, 8, 4, requires_grad=True)
    # the config's own patch: torch 2.6's config module loses the name after monkeypatch's setattr and undo
    with cfg.patch(**{name: 8}):
        for gm, rg, b, dt in itertools.product([True, False], [True, False], [1, 2], [torch.float32, torch.bfloat16]):
            x = torch.randn(b, 2, 5 + b, 8, dtype=dt).requires_grad_(rg)
            with torch.set_grad_enabled(gm):
                y = hedgehog_features(x, w, compiled=True)
            torch.testing.assert_close(y, hedgehog_features(x, w), rtol=2e-2, atol=2e-2)
        assert getattr(cfg, name) >= fused.FUSED_RECOMPILE_LIMIT
    assert not [h for h in hits if "recompile_limit" in str(h) or "cache_size_limit" in str(h)]


@pytest.mark.parametrize("name,opts,mapped_heads", [("performer", {"num_features": 16}, 2), ("linear", {}, 2),
                                                     ("rfa", {"num_features": 16, "normalize": True}, 6)])
def test_gqa_keys_are_mapped_once_per_kv_head_where_the_map_is_shared(name, opts, mapped_heads):
    # head-shared maps (FAVOR+, elu + 1) see the 2 kv heads; RFA's unit map has a sigma per head and sees all 6
    m = attnlab.make(name, head_dim=8, num_heads=6, num_kv_heads=2, **opts)
    seen = []
    fm = m.maps()[1]
    hook = fm.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[1]))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, 10, 8, generator=g) for h in (6, 2, 2))
    m(q, k, v, causal=True)
    hook.remove()
    assert seen[-1] == mapped_heads


def test_kernel_choice_is_remembered_per_shape_and_dtype(monkeypatch):
    """The (core, compiled) choice is made once per (device, causal, Tq, Tk, dtype, backend), not on every call, and
    a new length or dtype makes it again (a choice for one shape must never serve another)."""
    import attnlab
    from attnlab.methods._kernel import KernelAttention

    m = attnlab.make("linear", head_dim=16, num_heads=2)
    made = []
    real = KernelAttention._choose_uncached
    monkeypatch.setattr(KernelAttention, "_choose_uncached", lambda self, *a: made.append(a[1:]) or real(self, *a))
    q = torch.randn(1, 2, 20, 16)
    for _ in range(3):
        m(q, q, q, causal=True)
    assert made == [(True, 20, 20)]
    m(q[:, :, :10], q[:, :, :10], q[:, :, :10], causal=True)
    m(q, q, q, causal=False)
    m(q.double(), q.double(), q.double(), causal=True)
    assert made == [(True, 20, 20), (True, 10, 10), (False, 20, 20), (True, 20, 20)]
