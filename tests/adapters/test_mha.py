"""`attnlab.nn.MultiheadAttention` against `torch.nn.MultiheadAttention`, and `replace_mha` / `restore_mha`.

Every case builds torch's module (seeded), loads its state_dict into attnlab's with method="dense" and
compares outputs and attention weights (fp32, <= 1e-5): torch's mask conventions (True = NOT allowed /
padding, float masks additive) must be translated exactly at the boundary.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import attnlab
from tests.adapters import max_diff

E, H, L, S, B = 16, 4, 5, 7, 3
TOL = 1e-5


def pair(method="dense", seed=0, **kw):
    torch.manual_seed(seed)
    ref = nn.MultiheadAttention(E, H, **kw).eval()
    with torch.no_grad():  # torch zero-inits the biases: make them matter
        for name, p in ref.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
    new = attnlab.nn.MultiheadAttention(E, H, method=method, **kw).eval()
    new.load_state_dict(ref.state_dict(), strict=True)
    return ref, new


def inputs(batch_first, kdim=E, vdim=E, unbatched=False, seed=1, self_attn=False):
    g = torch.Generator().manual_seed(seed)

    def r(t, e):
        shape = (t, e) if unbatched else ((B, t, e) if batch_first else (t, B, e))
        return torch.randn(*shape, generator=g)

    q = r(L, E)
    if self_attn:
        return q, q, q
    return q, r(S, kdim), r(S, vdim)


def check(ref, new, *args, tol=TOL, **kw):
    with torch.no_grad():
        out_r, w_r = ref(*args, **kw)
        out_n, w_n = new(*args, **kw)
    assert out_n.shape == out_r.shape
    err = max_diff(out_n, out_r)
    assert err <= tol, f"output differs by {err:.2e}"
    if w_r is None:
        assert w_n is None
    else:
        assert w_n is not None and w_n.shape == w_r.shape
        assert max_diff(w_n, w_r) <= tol, f"weights differ by {max_diff(w_n, w_r):.2e}"
    return out_n, w_n


def kpm_bool():
    m = torch.zeros(B, S, dtype=torch.bool)  # True = padding (torch)
    m[0, -2:] = True
    m[2, -4:] = True
    return m


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_plain(batch_first, average):
    ref, new = pair(batch_first=batch_first)
    _, w = check(ref, new, *inputs(batch_first), need_weights=True, average_attn_weights=average)
    assert w.shape == ((B, L, S) if average else (B, H, L, S))
    check(ref, new, *inputs(batch_first), need_weights=False)


@pytest.mark.parametrize("average", [True, False])
def test_unbatched(average):
    ref, new = pair()
    out, w = check(ref, new, *inputs(False, unbatched=True), need_weights=True, average_attn_weights=average)
    assert out.shape == (L, E) and w.shape == ((L, S) if average else (H, L, S))
    kpm = torch.zeros(S, dtype=torch.bool)
    kpm[-3:] = True
    check(ref, new, *inputs(False, unbatched=True), key_padding_mask=kpm, average_attn_weights=average)


@pytest.mark.parametrize("batch_first", [True, False])
def test_key_padding_mask_bool_and_float(batch_first):
    ref, new = pair(batch_first=batch_first)
    kpm = kpm_bool()
    _, w = check(ref, new, *inputs(batch_first), key_padding_mask=kpm, average_attn_weights=False)
    assert (w[kpm[:, None, None, :].expand_as(w)] == 0).all()
    fkpm = torch.zeros(B, S).masked_fill(kpm, float("-inf"))
    check(ref, new, *inputs(batch_first), key_padding_mask=fkpm, average_attn_weights=False)
    check(ref, new, *inputs(batch_first), key_padding_mask=kpm, need_weights=False)


def test_key_padding_mask_float_additive():
    """A float key_padding_mask is ADDED to the scores by torch: finite non-zero values must not be dropped."""
    ref, new = pair(batch_first=True)
    fkpm = torch.randn(B, S, generator=torch.Generator().manual_seed(5))
    fkpm[1, -2:] = float("-inf")
    check(ref, new, *inputs(True), key_padding_mask=fkpm, average_attn_weights=False)
    _, lin = pair("linear", batch_first=True)
    with pytest.raises(attnlab.UnsupportedError, match="attn_mask"):  # cannot add a bias: refused, not dropped
        lin(*inputs(True), key_padding_mask=fkpm, need_weights=False)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attn_mask_2d_and_3d(batch_first):
    ref, new = pair(batch_first=batch_first)
    g = torch.Generator().manual_seed(7)
    m2 = torch.rand(L, S, generator=g) < 0.3  # True = NOT allowed (torch)
    m2[:, 0] = False  # no fully masked row (torch gives NaN there, attnlab zeros)
    check(ref, new, *inputs(batch_first), attn_mask=m2, average_attn_weights=False)
    m3 = torch.rand(B * H, L, S, generator=g) < 0.3
    m3[..., 1] = False
    check(ref, new, *inputs(batch_first), attn_mask=m3, average_attn_weights=False)
    check(ref, new, *inputs(batch_first), attn_mask=m3, key_padding_mask=kpm_bool(), need_weights=False)
    f3 = torch.randn(B * H, L, S, generator=g)  # float: additive
    check(ref, new, *inputs(batch_first), attn_mask=f3, average_attn_weights=False)
    check(ref, new, *inputs(batch_first), attn_mask=f3.masked_fill(m3, float("-inf")), key_padding_mask=kpm_bool())


def test_attn_mask_unbatched_3d():
    ref, new = pair()
    m3 = torch.rand(H, L, S, generator=torch.Generator().manual_seed(8)) < 0.3
    m3[..., 0] = False
    check(ref, new, *inputs(False, unbatched=True), attn_mask=m3, average_attn_weights=False)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_is_causal(batch_first, need_weights):
    ref, new = pair(batch_first=batch_first)
    causal = nn.Transformer.generate_square_subsequent_mask(L)  # float, -inf above the diagonal
    x = inputs(batch_first, self_attn=True)
    out, w = check(ref, new, *x, attn_mask=causal, is_causal=True, need_weights=need_weights)
    check(ref, new, *x, attn_mask=causal.isinf(), is_causal=True, need_weights=need_weights)  # bool form
    if need_weights:
        assert (w[..., torch.ones(L, L, dtype=torch.bool).triu(1)] == 0).all()
    # and the causal flag reaches the method: a linear method gives the same as its own masked form
    _, lin = pair("linear", batch_first=batch_first)
    with torch.no_grad():
        a, _ = lin(*x, attn_mask=causal, is_causal=True, need_weights=False)
        y = [t.clone() for t in x]
        tdim = 1 if batch_first else 0
        y[0].narrow(tdim, L - 1, 1).add_(3.0)  # perturb the last position: earlier outputs must not move
        b, _ = lin(y[0], y[0], y[0], attn_mask=causal, is_causal=True, need_weights=False)
    assert max_diff(a.narrow(tdim, 0, L - 1), b.narrow(tdim, 0, L - 1)) <= TOL
    assert max_diff(a.narrow(tdim, L - 1, 1), b.narrow(tdim, L - 1, 1)) > 1e-3


@pytest.mark.parametrize("batch_first", [True, False])
def test_kdim_vdim(batch_first):
    ref, new = pair(batch_first=batch_first, kdim=6, vdim=10)
    assert not new._qkv_same_embed_dim and new.in_proj_weight is None
    check(ref, new, *inputs(batch_first, kdim=6, vdim=10), average_attn_weights=False)
    check(ref, new, *inputs(batch_first, kdim=6, vdim=10), key_padding_mask=kpm_bool())


def test_no_bias():
    ref, new = pair(bias=False)
    check(ref, new, *inputs(False))


def test_state_dict_compatibility():
    ref, new = pair()
    assert list(new.state_dict()) == list(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(new.state_dict()[k], v)
    # a method with its own parameters still loads torch's state_dict strictly (its own are kept)
    lin = attnlab.nn.MultiheadAttention(E, H, method="linformer", max_len=S, proj_len=4)
    own = {k: v.clone() for k, v in lin.state_dict().items() if k.startswith("attnlab_method.")}
    assert own
    res = lin.load_state_dict(ref.state_dict(), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    assert all(torch.equal(lin.state_dict()[k], v) for k, v in own.items())
    assert torch.equal(lin.in_proj_weight, ref.in_proj_weight)


def test_need_weights_with_a_method_without_probs():
    ref, new = pair("sdpa")
    assert not attnlab.capabilities("sdpa").probs
    x = inputs(False)
    with pytest.raises(attnlab.UnsupportedError, match="sdpa.*need_weights=False"):
        new(*x)  # torch's default is need_weights=True
    check(ref, new, *x, need_weights=False)


# ---------------------------------------------------------------------------------------------------------------
# replace_mha / restore_mha on nn.TransformerEncoder
# ---------------------------------------------------------------------------------------------------------------
def encoder(enable_nested_tensor: bool):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=enable_nested_tensor).eval()
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.5)
    return enc


@pytest.mark.parametrize("undo", ["restore_mha", "unswap"])
@pytest.mark.parametrize("nested", [True, False])
def test_replace_mha_transformer_encoder(nested, undo):
    enc = encoder(nested)
    x = torch.randn(B, S, E, generator=torch.Generator().manual_seed(2))
    pad = kpm_bool()
    real = ~pad
    originals = [m for m in enc.modules() if isinstance(m, nn.MultiheadAttention)]
    weights = {k: v.clone() for k, v in enc.state_dict().items()}
    with torch.no_grad():
        before = enc(x, src_key_padding_mask=pad)
        before_nopad = enc(x)
    if nested:
        assert enc.use_nested_tensor
        assert (before[pad] == 0).all()  # torch's nested fast path really ran (padded outputs are 0)

    attnlab.replace_mha(enc, "dense")
    news = [m for m in enc.modules() if isinstance(m, nn.MultiheadAttention)]
    assert len(news) == 2 and all(isinstance(m, attnlab.nn.MultiheadAttention) for m in news)
    assert enc.state_dict().keys() == weights.keys()
    assert all(torch.equal(enc.state_dict()[k], v) for k, v in weights.items())
    calls = []
    hooks = [m.attnlab_method.register_forward_hook(lambda *a: calls.append(1)) for m in news]
    with torch.no_grad():
        after = enc(x, src_key_padding_mask=pad)
        after_nopad = enc(x)
    for h in hooks:
        h.remove()
    assert len(calls) == 4, "the fused fast path bypassed the method"
    assert max_diff(after[real], before[real]) <= TOL
    assert max_diff(after_nopad, before_nopad) <= TOL
    assert torch.isfinite(after).all()

    getattr(attnlab, undo)(enc) if undo == "unswap" else attnlab.nn.restore_mha(enc)
    assert [m for m in enc.modules() if isinstance(m, nn.MultiheadAttention)] == originals
    assert all(type(m) is nn.MultiheadAttention for m in originals)
    assert enc.use_nested_tensor == nested
    assert not hasattr(enc, "_attnlab_nested")
    with torch.no_grad():
        assert torch.equal(enc(x, src_key_padding_mask=pad), before)
    assert not attnlab.nn.restore_mha(enc)


def test_replace_mha_keeps_training_mode_and_refuses_models_without_mha():
    enc = encoder(False).train()
    attnlab.replace_mha(enc, "dense")
    assert all(m.training for m in enc.modules() if isinstance(m, attnlab.nn.MultiheadAttention))
    attnlab.nn.restore_mha(enc)
    with pytest.raises(attnlab.UnsupportedError, match="no torch.nn.MultiheadAttention"):
        attnlab.replace_mha(nn.Linear(3, 3), "dense")


def test_swap_on_a_plain_torch_model_uses_replace_mha():
    enc = encoder(False)
    x = torch.randn(2, S, E)
    with torch.no_grad():
        before = enc(x)
    with attnlab.swapped(enc, "window", window=1):
        assert all(isinstance(m, attnlab.nn.MultiheadAttention) for m in enc.modules()
                   if isinstance(m, nn.MultiheadAttention))
        with torch.no_grad():
            assert max_diff(enc(x), before) > 1e-3  # a narrow window really changes the outputs
    with torch.no_grad():
        assert torch.equal(enc(x), before)


def test_is_causal_with_float_key_bias():
    ref, new = pair(batch_first=True)
    causal = nn.Transformer.generate_square_subsequent_mask(L)
    x = inputs(True, self_attn=True)
    fkpm = torch.randn(B, L, generator=torch.Generator().manual_seed(4))
    check(ref, new, *x, attn_mask=causal, is_causal=True, key_padding_mask=fkpm, average_attn_weights=False)
