"""What is special to the trainable methods of distillation: hedgehog, hybrid (LoLCATs), learned_mask (static
and content forms), performer with learned features. The conformance suite covers exact limits, causal,
padding, GQA, gradients, state."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.feature_maps import Hedgehog
from tests.helpers import assert_matches_reference, make, max_err, rand_qkv


def _params_get_grads(m, q, k, v, **kw):
    m.train()
    m(q, k, v, **kw).out.pow(2).sum().backward()
    got = {n: p.grad for n, p in m.named_parameters()}
    assert got and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in got.values()), got
    return got


# ---- hedgehog ---------------------------------------------------------------------------------------------------
def test_hedgehog_map_is_identity_initialised_softmax_halves():
    fm = Hedgehog(num_heads=2, head_dim=4, feature_dim=6)
    x = torch.randn(1, 2, 5, 4)
    phi, _ = fm(x, scale=1.0, is_query=True)
    z = torch.nn.functional.pad(x, (0, 2))  # identity on the first min(D, F) = 4 dims, zeros after
    want = torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)
    torch.testing.assert_close(phi, want)
    torch.testing.assert_close(phi[..., :6].sum(-1), torch.ones(1, 2, 5))  # each half sums to 1


def test_hedgehog_maps_train():
    q, k, v = rand_qkv(h=4, hkv=2, tq=20, d=16)
    m = make("hedgehog", q, k, feature_dim=8, chunk_size=8)
    grads = _params_get_grads(m, q, k, v, causal=True)
    assert set(grads) == {"fm_q.weight", "fm_k.weight"}


# ---- hybrid -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [0, 3, 9])
def test_hybrid_chunked_equals_its_quadratic_form(causal, window):
    q, k, v = rand_qkv(h=4, hkv=2, tq=37, d=16, dtype=torch.float64, seed=window)
    kpm = torch.ones(2, 37, dtype=torch.bool)
    kpm[1, :5] = False
    m = make("hybrid", q, k, window=window, feature_dim=8, chunk_size=8).double()
    with torch.no_grad():
        m.window_logit.copy_(torch.linspace(-2, 2, 4))  # per-head weights, not the uniform init
    out = m(q, k, v, causal=causal, key_padding_mask=kpm).out
    quad = m(q, k, v, causal=causal, key_padding_mask=kpm, need_probs=True)
    assert max_err(out, quad.out) < 1e-10
    if causal:
        assert (quad.probs.double().triu(1) == 0).all()


def test_hybrid_mixes_the_two_kinds_with_a_learned_weight():
    q, k, v = rand_qkv(h=2, tq=24, d=16, seed=3)
    m = make("hybrid", q, k, window=4, feature_dim=8)
    assert torch.allclose(torch.sigmoid(m.window_logit), torch.full((2,), 0.1))  # LoLCATs' init
    full = make("hybrid", q, k, window=24, feature_dim=8)
    assert_matches_reference(full(q, k, v, causal=True).out, q, k, v, causal=True)  # window >= T: softmax
    a = m(q, k, v, causal=True).out
    with torch.no_grad():
        m.window_logit.fill_(8.0)  # g -> 1: the window dominates the far keys' linear terms more
    assert max_err(a, m(q, k, v, causal=True).out) > 1e-3
    grads = _params_get_grads(m, q, k, v, causal=True)
    assert set(grads) == {"fm_q.weight", "fm_k.weight", "window_logit"}
    with pytest.raises(attnlab.UnsupportedError, match="non-causal hybrid attention needs Tq == Tk"):
        q2, k2, v2 = rand_qkv(h=2, tq=5, tk=9, d=16)
        m(q2, k2, v2)


# ---- learned_mask, static ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("density", [0.25, 0.5, 0.8])
@pytest.mark.parametrize("nb", [8, 16, 33])
def test_static_layout_meets_the_density_at_every_length(density, nb):
    m = attnlab.make("learned_mask", head_dim=8, num_heads=3, density=density, block_size=4, max_blocks=64)
    with torch.no_grad():
        m.scores.normal_(generator=torch.Generator().manual_seed(nb))
    lay = m.static_layout(nb, causal=True)  # (H, nb, nb)
    causal_pairs = nb * (nb + 1) // 2
    kept = int(lay.sum())  # the heads share the layer's budget
    target = 3 * -(-density * causal_pairs // 1)
    forced = 3 * nb  # the diagonal block is always kept (sinks are tokens, in the band)
    assert target <= kept <= max(target, forced) + nb  # one distance adds at most nb pairs
    assert not lay.triu(1).any()  # causal
    assert lay[:, torch.arange(nb), torch.arange(nb)].all()  # the diagonal is kept


def test_heads_share_the_budget():
    """A head whose far distances score high takes them; the others keep less (same layer total)."""
    m = attnlab.make("learned_mask", head_dim=8, num_heads=2, density=0.4, block_size=4, max_blocks=64, local=0)
    with torch.no_grad():
        m.scores[1] = torch.linspace(5, 6, 64)  # head 1 prefers every distance, the farther the better
    lay = m.static_layout(16, causal=True)
    assert lay[1].sum() > lay[0].sum()
    assert lay[1][15, 1]  # head 1 reaches far back


def test_static_untrained_is_a_window_and_transfers_across_lengths():
    m = attnlab.make("learned_mask", head_dim=8, num_heads=2, density=0.3, block_size=4, max_blocks=64)
    lay = m.static_layout(20, causal=True)[0]
    dist = torch.arange(20)[:, None] - torch.arange(20)[None, :]
    kept_d = {int(d) for d in dist[lay & (torch.arange(20)[None, :] > 0)].unique()}
    assert kept_d == set(range(min(kept_d), max(kept_d) + 1)) and min(kept_d) <= 1  # the nearest distances
    assert m.static_layout(40, causal=True).shape == (2, 40, 40)  # the same scores serve another length


def test_static_training_path_equals_the_sparse_path_and_trains_the_scores():
    q, k, v = rand_qkv(h=4, hkv=2, tq=35, d=16, seed=5)
    m = make("learned_mask", q, k, density=0.4, block_size=4, max_blocks=16)
    with torch.no_grad():
        m.scores.normal_(generator=torch.Generator().manual_seed(1))
    m.train()
    train_out = m(q, k, v, causal=True).out
    assert m.kernel.endswith("+st")  # the sparse kernel with the straight-through gradient attached
    m.eval()
    with torch.no_grad():
        eval_out = m(q, k, v, causal=True).out
    assert m.kernel in ("torch", "flex")
    assert max_err(train_out, eval_out) < 1e-5  # straight-through: the forward is the hard mask
    lay = m.static_layout(9, True)
    mask = m._token_mask(lay, 35, 35)[None]
    assert_matches_reference(eval_out, q, k, v, attn_mask=mask, causal=True)
    grads = _params_get_grads(m, q, k, v, causal=True)
    assert grads["scores"][:, :9].abs().sum() > 0 and (grads["scores"][:, 9:] == 0).all()  # only distances in use


@pytest.mark.parametrize("causal,padded,tq", [(True, False, 40), (True, True, 40), (False, True, 40), (True, False, 24)])
def test_static_training_gradient_equals_the_chunked_gated_reference(causal, padded, tq):
    """The training path (sparse forward + the gates' gradient from one dense pass in the backward) gives the
    same output and the same gradients for q, k, v and the scores as the straight-through gates run through
    `ops.gated.gated_attention` (the dense, checkpointed reference), fp64: padding, Tq < Tk (bottom-right)."""
    from attnlab.ops.gated import gated_attention

    g = torch.Generator().manual_seed(3)
    h, d, tk = 4, 16, 40
    m = attnlab.make("learned_mask", head_dim=d, num_heads=h, density=0.4, block_size=8, max_blocks=16).double()
    with torch.no_grad():
        m.scores.normal_(generator=g)
    m.train()
    q = torch.randn(2, h, tq, d, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, h, tk, d, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    kpm = None
    if padded:
        kpm = torch.ones(2, tk, dtype=torch.bool)
        kpm[1, -5:] = False
    dout = torch.randn(2, h, tq, d, generator=g, dtype=torch.float64)
    out = m(q, k, v, causal=causal, key_padding_mask=kpm).out
    got = torch.autograd.grad(out, (q, k, v, m.scores), dout)
    ref = gated_attention(q, k, v, m._static_gate(tq, tk, causal), scale=d ** -0.5, causal=causal,
                          key_padding_mask=kpm, chunk=8)
    want = torch.autograd.grad(ref, (q, k, v, m.scores), dout)
    assert max_err(out, ref) < 1e-12
    for name, a, b in zip(("q", "k", "v", "scores"), got, want):
        assert b.abs().max() > 0, name
        assert max_err(a, b) < 1e-10 * max(1.0, b.abs().max().item()), name


def test_static_length_beyond_the_scores_is_refused_and_density_checked():
    m = attnlab.make("learned_mask", head_dim=16, num_heads=4, block_size=4, max_blocks=4)
    q, k, v = rand_qkv(h=4, tq=20, d=16)
    with pytest.raises(attnlab.UnsupportedError, match="max_len=16"):
        m(q, k, v, causal=True)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(attnlab.OptionError, match="density"):
            attnlab.make("learned_mask", head_dim=16, num_heads=4, density=bad)


# ---- learned_mask, content (SeerAttention) ------------------------------------------------------------------------
def test_content_gate_selects_per_input_and_trains_toward_the_block_distribution():
    q, k, v = rand_qkv(h=4, hkv=2, tq=32, d=16, seed=7)
    m = make("learned_mask", q, k, form="content", density=0.5, block_size=4, gate_dim=8)
    scores = m._pooled_scores(q, k.repeat_interleave(2, 1), causal=True)
    lay = m.content_layout(scores, causal=True)  # (B, H, 8, 8)
    assert lay.shape == (2, 4, 8, 8) and not torch.equal(lay[0], lay[1])  # depends on the input
    assert lay[..., torch.arange(8), torch.arange(8)].all()
    assert m._token_mask(lay, 32, 32)[..., :4].all()  # the 4 sink tokens, always (causal is applied on top)
    rows = lay.sum(-1)
    assert (rows <= torch.ceil(0.5 * torch.arange(1, 9)) + 2).all()
    m.train()
    out = m(q, k, v, causal=True).out
    assert m.aux_loss is not None and torch.isfinite(m.aux_loss) and m.aux_loss > 0
    m.aux_loss.backward()
    assert m.w_q.grad.abs().sum() > 0 and m.w_k.grad.abs().sum() > 0
    m.eval()
    with torch.no_grad():
        again = m(q, k, v, causal=True).out
    assert m.aux_loss is None
    torch.testing.assert_close(out.detach(), again)
    mask = m._token_mask(lay, 32, 32)
    assert_matches_reference(again, q, k, v, attn_mask=mask, causal=True)


# ---- performer with a learned projection -----------------------------------------------------------------------
def test_performer_learned_features_are_parameters():
    q, k, v = rand_qkv(h=2, tq=16, d=16)
    m = make("performer", q, k, num_features=32, learn_features=True)
    assert [n for n, _ in m.named_parameters()] == ["feature_map.features"]
    _params_get_grads(m, q, k, v, causal=True)
    with pytest.raises(attnlab.OptionError, match="exclude each other"):
        make("performer", q, k, learn_features=True, redraw=True)


def test_calibration_measures_the_attention_mass_per_head_and_distance():
    """init="data": scores = log of the mean probability a query puts on one key block at each distance. On
    hand-made keys where head 0 looks at its own block and head 1 at the first block, the scores say so."""
    torch.manual_seed(0)
    t, bs = 24, 4  # 6 blocks, rows of 4 queries (not equal to the number of blocks: shapes cannot coincide)
    q = torch.zeros(1, 2, t, 8)
    k = torch.zeros(1, 2, t, 8)
    pos_block = torch.arange(t) // bs  # head 0: a query matches the keys of its own block; head 1: block 0
    q[:, 0, :, :6] = torch.nn.functional.one_hot(pos_block, 6).float() * 8
    k[:, 0, :, :6] = torch.nn.functional.one_hot(pos_block, 6).float()
    q[:, 1, :, 7] = 8.0
    k[:, 1, :, 7] = (pos_block == 0).float()
    m = attnlab.make("learned_mask", head_dim=8, num_heads=2, block_size=bs, max_blocks=8, init="data", density=0.3,
                     sinks=0)
    assert m.needs_calibration()
    m.calibrate(q, k, causal=True, scale=1.0)
    assert not m.needs_calibration()
    s = m.scores.detach()
    assert s[0, 0] > s[0, 1:6].max()  # head 0: distance 0
    assert s[1, 5] > s[1, 1]  # head 1: block 0 seen from the last row (distance 5) beats a neighbour block


def test_calibration_of_a_left_padded_batch_counts_each_row_from_its_first_key():
    """The mask counts its block grid and sinks from a row's first real key; calibration measures them so too: a
    left-padded row calibrates as the row alone, and a batch of a padded and a full row as their pooled mass."""
    q, k, _ = rand_qkv(b=2, h=2, tq=24, d=8, seed=5)
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[0, :9] = False

    def scores(*args, causal=True, **kw):
        m = attnlab.make("learned_mask", head_dim=8, num_heads=2, block_size=4, max_blocks=8, init="data", sinks=1)
        m.calibrate(*args, causal=causal, scale=0.5, **kw)
        return m.scores.detach().clone()

    alone = scores(q[:1, :, 9:], k[:1, :, 9:])
    padded = scores(q[:1], k[:1], key_padding_mask=kpm[:1])
    assert torch.allclose(padded, alone, atol=1e-6)
    # not causal: the padded tokens' own queries are left out, as the mask leaves them (this raised before)
    assert torch.allclose(scores(q[:1], k[:1], key_padding_mask=kpm[:1], causal=False),
                          scores(q[:1, :, 9:], k[:1, :, 9:], causal=False), atol=1e-6)
    assert not torch.allclose(scores(q[:1], k[:1]), alone, atol=1e-3)  # from position 0 the padding would count
    both = scores(q, k, key_padding_mask=kpm)
    assert not torch.allclose(both, alone, atol=1e-3) and not torch.allclose(both, scores(q[1:], k[1:]), atol=1e-3)
    assert scores(q[1:], k[1:], key_padding_mask=kpm[1:]).equal(scores(q[1:], k[1:]))  # no padding: as before


def test_content_gate_loss_not_causal_with_key_padding():
    """The gate's target under key padding alone (a mask every query row shares) covers every block of query rows:
    it raised past the first before (the shared mask was sliced by query rows)."""
    m = attnlab.make("learned_mask", head_dim=16, num_heads=4, form="content", block_size=4).train()
    q, k, v = rand_qkv(b=2, h=4, tq=20, d=16, seed=3)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[0, 15:] = False
    m(q, k, v, causal=False, key_padding_mask=kpm)
    padded = m.aux_loss
    m(q, k, v, causal=False)
    assert torch.isfinite(padded) and abs(padded.item() - m.aux_loss.item()) > 1e-6


def test_content_gate_loss_of_a_left_padded_batch_is_the_rows_mean():
    """learned_mask counts its block grid from a row's first real key (rows grouped by leading padding): the gate
    loss it leaves for training is then the mean of the rows' own losses, not the last group's."""
    m = attnlab.make("learned_mask", head_dim=16, num_heads=4, form="content", block_size=4).train()
    q, k, v = rand_qkv(b=2, h=4, tq=20, d=16, seed=2)
    kpm = torch.ones(2, 20, dtype=torch.bool)
    kpm[0, :7] = False
    m(q, k, v, causal=True, key_padding_mask=kpm)
    both = m.aux_loss
    m(q[:1, :, 7:], k[:1, :, 7:], v[:1, :, 7:], causal=True)
    first = m.aux_loss
    m(q[1:], k[1:], v[1:], causal=True)
    assert abs(first.item() - m.aux_loss.item()) > 1e-4  # the rows differ, so a single group's loss would show
    torch.testing.assert_close(both, (first + m.aux_loss) / 2)
    m(q, k, v, causal=True, key_padding_mask=torch.zeros(2, 20, dtype=torch.bool))  # no row has a real key
    assert m.aux_loss is None  # not the previous call's
