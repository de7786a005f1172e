"""KV-cache presses: budgets exact, selection on hand-made queries and keys, the full cache exact, no causal leak
after eviction, greedy generation on a pressed cache, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

import attnlab
from attnlab.reduction import kv_press as kp
from tests.helpers import assert_cli_one_line_error


@pytest.fixture(scope="module")
def tiny():
    from tests.adapters import tiny_model

    return tiny_model("llama", num_hidden_layers=2).eval()


def _ids(n, seed=0):
    return torch.randint(0, 100, (1, n), generator=torch.Generator().manual_seed(seed))


def test_budgets_and_bad_input():
    assert kp.get_press("knorm", evict=0.5).budget(10) == 5
    assert kp.get_press("knorm", evict=0.25).budget(10) == 8  # floor(2.5) evicted
    assert kp.get_press("knorm", keep_tokens=3).budget(10) == 3 and kp.get_press("knorm", keep_tokens=30).budget(10) == 10
    with pytest.raises(attnlab.AttnlabError, match=r"evict must be a fraction in \[0, 1\)"):
        kp.get_press("snapkv", evict=1.0)
    with pytest.raises(attnlab.AttnlabError, match="exactly one of"):
        kp.get_press("tova", evict=0.5, keep_tokens=3)
    with pytest.raises(attnlab.AttnlabError, match="unknown press"):
        kp.get_press("nope", evict=0.5)


def test_scores_on_hand_made_queries_and_keys():
    t, d = 8, 4
    k = torch.zeros(1, 1, t, d)
    k[0, 0, :, 0] = torch.tensor([0.0, 0.0, 5.0, 0.0, 0.0, 1.0, 0.0, 0.0])  # key 2 matches strongly, key 5 a little
    q = torch.zeros(1, 2, t, d)
    q[..., 0] = 2.0  # every query (both heads, one KV head) looks for feature 0
    tova = kp.get_press("tova", evict=0.5).score(q, k, scale=1.0)
    assert tova.shape == (1, 1, t) and tova[0, 0].argmax() == 2 and tova[0, 0, 5] > tova[0, 0, 0]
    h2o = kp.get_press("h2o", evict=0.5).score(q, k, scale=1.0)
    s = (q[0, 0] @ k[0, 0].T).masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf")).softmax(-1)
    torch.testing.assert_close(h2o[0, 0], s.sum(0))  # column sums of the causal matrix (both heads alike)
    mean = kp.get_press("h2o_mean", evict=0.5).score(q, k, scale=1.0)
    torch.testing.assert_close(mean[0, 0], s.sum(0) / torch.arange(t, 0, -1))  # key j is seen by t - j queries
    last = kp.get_press("h2o_mean", evict=0.5).score(q[:, :, -3:], k, scale=1.0)  # 3 newest queries (streaming)
    torch.testing.assert_close(last[0, 0], s[-3:].sum(0) / torch.arange(t, 0, -1).clamp(max=3))
    knorm = kp.get_press("knorm", evict=0.5).score(q, k, scale=1.0)
    assert knorm[0, 0].argmin() == 2  # the largest key goes first
    stream = kp.get_press("streaming_llm", evict=0.5, sinks=2).score(q, k, scale=1.0)
    assert torch.topk(stream[0, 0], 4).indices.sort().values.tolist() == [0, 1, 6, 7]
    window = kp.get_press("window", evict=0.5).score(q, k, scale=1.0)
    assert torch.topk(window[0, 0], 4).indices.sort().values.tolist() == [4, 5, 6, 7]
    snap = kp.get_press("snapkv", evict=0.5, window=2, kernel=1).score(q, k, scale=1.0)
    assert torch.isinf(snap[0, 0, -2:]).all() and snap[0, 0, :6].argmax() == 2


def test_snapkv_h2o_mean_sums_the_two_normalised_scores_and_keeps_the_window():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    snap = kp.get_press("snapkv", evict=0.5, window=4, kernel=1).score(q, k, scale=0.3)
    mean = kp.get_press("h2o_mean", evict=0.5).score(q, k, scale=0.3)
    mix = kp.get_press("snapkv_h2o_mean", evict=0.5, window=4, kernel=1, weight=0.7).score(q, k, scale=0.3)
    assert torch.isinf(mix[..., -4:]).all() and torch.isfinite(mix[..., :-4]).all()
    s = snap[..., :-4]
    want = s / snap.masked_fill(torch.isinf(snap), 0).sum(-1, keepdim=True) + 0.7 * mean[..., :-4] / mean.sum(-1, keepdim=True)
    torch.testing.assert_close(mix[..., :-4], want)
    only_snap = kp.get_press("snapkv_h2o_mean", evict=0.5, window=4, kernel=1, weight=0).score(q, k, scale=0.3)
    assert torch.equal(torch.topk(only_snap, 20).indices.sort().values, torch.topk(snap, 20).indices.sort().values)
    for bad in (-1, True, float("inf"), "x"):
        with pytest.raises(attnlab.AttnlabError, match="weight must be a number >= 0"):
            kp.get_press("snapkv_h2o_mean", evict=0.5, weight=bad)


def test_full_cache_is_exact_budget_is_exact_and_nothing_leaks(tiny):
    ids = _ids(40)
    with torch.no_grad():
        ref = tiny(ids).logits[:, 24:]
    for name in kp.PRESSES:
        cache, kept, last = kp.prefill(tiny, ids[:, :24], kp.get_press(name, evict=0.0))
        torch.testing.assert_close(kp.continue_scoring(tiny, cache, ids[:, 24:], start=24), ref, atol=1e-5, rtol=1e-4)
        cache, kept, _ = kp.prefill(tiny, ids[:, :24], kp.get_press(name, evict=0.5))
        assert kept.shape == (2, 1, 2, 12) and cache.get_seq_length() == 12  # layers, batch, KV heads, budget
        assert (kept.diff(dim=-1) > 0).all()  # distinct, ascending
        if name == "streaming_llm":
            assert kept[..., :4].eq(torch.arange(4)).all() and kept[..., -1].eq(23).all()
    press = kp.get_press("h2o", evict=0.5)
    changed = ids.clone()
    changed[:, 35:] = (changed[:, 35:] + 7) % 100  # later continuation tokens differ
    a = kp.continue_scoring(tiny, kp.prefill(tiny, ids[:, :24], press)[0], ids[:, 24:], start=24)
    b = kp.continue_scoring(tiny, kp.prefill(tiny, ids[:, :24], press)[0], changed[:, 24:], start=24)
    torch.testing.assert_close(a[:, :11], b[:, :11])  # positions before the change see nothing after it
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_generation_on_a_pressed_cache_matches_full_decoding_at_evict_0(tiny):
    ids = _ids(16, seed=1)
    with torch.no_grad():
        want = tiny.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)[:, 16:]
    assert torch.equal(kp.generate(tiny, ids, kp.get_press("snapkv", evict=0.0), 6), want)
    assert torch.equal(kp.generate(tiny, ids, None, 6), want)
    assert kp.generate(tiny, ids, kp.get_press("tova", evict=0.5), 6).shape == (1, 6)


def test_bounded_cache_equals_window_attention(tiny):
    """A cache bounded to K tokens by the recency presses, fed one token at a time, IS sliding-window attention:
    `window` keeps the last K keys (token t sees t-K..t: the window method with window=K), `streaming_llm` 4 sinks
    and the last K-4 (window=K-4, sinks=4). The independent reference is attnlab's window method swapped in."""
    ids = _ids(40, seed=2)
    for press, opts in ((kp.get_press("window", keep_tokens=9), {"window": 9}),
                        (kp.get_press("streaming_llm", keep_tokens=12), {"window": 8, "sinks": 4})):
        got, longest = kp.stream(tiny, ids, press, chunk=1)
        assert longest == press.keep_tokens + 1
        with attnlab.swapped(tiny, "window", **opts), torch.no_grad():
            want = tiny(ids).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_streaming_is_exact_until_the_first_eviction_and_bounded_after(tiny):
    ids = _ids(40, seed=3)
    with torch.no_grad():
        ref = tiny(ids).logits
    full, longest = kp.stream(tiny, ids, None, chunk=8)
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-4)
    assert longest == 40
    for name in kp.PRESSES:
        got, longest = kp.stream(tiny, ids, kp.get_press(name, keep_tokens=16), chunk=8)
        assert longest == 24, name  # 16 kept + the newest chunk of 8
        torch.testing.assert_close(got[:, :24], ref[:, :24], atol=1e-5, rtol=1e-4)  # the first press follows token 23
        assert not torch.allclose(got[:, 24:], ref[:, 24:], atol=1e-3), name
    kept_all, _ = kp.stream(tiny, ids, kp.get_press("h2o", keep_tokens=40), chunk=8)
    torch.testing.assert_close(kept_all, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(attnlab.AttnlabError, match="keep_tokens=N"):
        kp.stream(tiny, ids, kp.get_press("tova", evict=0.5))


def test_bounded_generation(tiny):
    ids = _ids(20, seed=4)
    seq = ids
    with torch.no_grad():  # greedy decoding by whole forwards, no cache: the reference
        for _ in range(6):
            seq = torch.cat([seq, tiny(seq).logits[:, -1:].argmax(-1)], dim=1)
    want = seq[:, 20:]
    assert torch.equal(kp.generate(tiny, ids, None, 6, bounded_cache=True), want)
    assert torch.equal(kp.generate(tiny, ids, kp.get_press("tova", keep_tokens=64), 6, bounded_cache=True), want)
    # a window-bounded cache, prompt fed a token at a time, decodes exactly as the window method does
    got = kp.generate(tiny, ids, kp.get_press("window", keep_tokens=8), 6, bounded_cache=True, chunk=1)
    seq = ids
    with attnlab.swapped(tiny, "window", window=8), torch.no_grad():
        for _ in range(6):
            seq = torch.cat([seq, tiny(seq).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(got, seq[:, 20:])


@pytest.mark.parametrize("args,match", [
    (["--evict", "1"], "--evict values must be in [0, 1)"),
    (["--presses", "nope"], "unknown press"),
    (["--prompt-len", "5000"], "--prompt-len 5000"),
    (["--seq-len", "99999"], "max_position_embeddings"),
    (["--model", "minilm"], "not a causal LM"),
    (["--presses", "adakv_snapkv", "--alpha", "1.5"], "alpha must be in"),
    (["--presses", "adakv_snapkv", "--max-cache", "64"], "press the prompt once"),
    (["--presses", "pyramid_snapkv", "--slope", "1"], "slope must be in"),
    (["--presses", "snapkv", "--alpha", "0.5"], "--alpha applies to adakv_<press> presses only"),
    (["--presses", "snapkv", "--slope", "0.5"], "--slope applies to pyramid_<press> presses only"),
    (["--chunk", "16"], "--chunk is for the bounded-cache mode, with --max-cache"),
])
def test_cli_bad_input_is_one_line(args, match, tmp_path, capsys, monkeypatch):
    import attnlab.models

    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    assert_cli_one_line_error(["press", *args, "--out", str(tmp_path / "out")], match, capsys, tmp_path / "out")


def test_cli_end_to_end_on_a_tiny_model(tiny_lm_dir, tmp_path, capsys):
    import attnlab.cli

    out = tmp_path / "out"
    assert attnlab.cli.main(["press", "--model", str(tiny_lm_dir), "--seq-len", "48", "--prompt-len", "32",
                             "--num-examples", "1", "--evict", "0,0.5", "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "press.json").read_text())
    rows = {(r["technique"], r["evict"]): r for r in res["rows"]}
    assert all(rows[(p, 0.0)]["kl"] < 1e-6 for p in kp.PRESSES)
    assert all(rows[(p, 0.5)]["kv_bytes"] * 2 == rows[("full_cache", 0.0)]["kv_bytes"] for p in kp.PRESSES)
    assert {"technique", "impl", "fraction", "metric", "value", "baseline_value", "ms", "peak_mem_bytes", "kv_bytes",
            "device"} <= res["result_rows"][0].keys()
    assert (out / "press.png").stat().st_size > 10_000 and "KV MiB" in capsys.readouterr().out


def test_cli_bounded_cache_mode(tiny_lm_dir, tmp_path, capsys):
    import attnlab.cli

    out = tmp_path / "out"
    assert attnlab.cli.main(["press", "--model", str(tiny_lm_dir), "--seq-len", "64", "--max-cache", "16,48",
                             "--chunk", "8", "--num-examples", "1", "--presses", "streaming_llm,tova", "--no-progress",
                             "--out", str(out)]) == 0
    res = json.loads((out / "press-bounded.json").read_text())
    rows = {(r["technique"], r["max_cache"]): r for r in res["rows"]}
    assert set(rows) == {(p, m) for p in ("full_cache", "streaming_llm", "tova") for m in (16, 48)}
    assert rows[("full_cache", 16)]["kl"] < 1e-9 and rows[("tova", 16)]["kl"] > 0
    assert rows[("tova", 16)]["longest_cache"] == 24 and rows[("full_cache", 16)]["longest_cache"] == 64
    assert rows[("tova", 16)]["from_position"] == 24 and rows[("tova", 48)]["from_position"] == 56
    assert (out / "press-bounded.png").stat().st_size > 10_000 and "bound" in capsys.readouterr().out


@pytest.mark.parametrize("args,match", [
    (["--max-cache", "abc"], "--max-cache must be comma-separated integers"),
    (["--max-cache", "2000", "--seq-len", "2048"], "--max-cache 2000 must be below"),
    (["--max-cache", "64", "--chunk", "0"], "--chunk"),
    (["--max-cache", "64", "--evict", "0.5"], "--evict is not used with --max-cache"),
    (["--max-cache", "64", "--prompt-len", "100"], "--prompt-len is not used with --max-cache"),
])
def test_cli_bounded_bad_input_is_one_line(args, match, tmp_path, capsys, monkeypatch):
    import attnlab.models

    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    assert_cli_one_line_error(["press", *args, "--out", str(tmp_path / "out")], match, capsys, tmp_path / "out")


def test_a_budget_below_the_kept_anyway_positions_keeps_the_newest_of_them():
    """SnapKV keeps its observation window whatever the scores (+inf): with fewer slots than the window, the newest
    window positions stay (equal scores went to whichever position topk returned), as AdaKV's per-head floor does."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 40, 8, generator=g), torch.randn(1, 2, 40, 8, generator=g)
    scores = kp.get_press("snapkv", keep_tokens=10, window=32).score(q, k, scale=0.3)
    assert torch.isinf(scores[..., -32:]).all()
    assert kp.top_newest(scores, 10).sort(-1).values.tolist() == [[list(range(30, 40))] * 2]
    for alpha in (1.0, 0.2):  # the per-head floor alone, and mostly the layer-wide rest
        chosen = kp.allocate(scores, 10, alpha=alpha)
        assert chosen[..., 30:].all() and not chosen[..., :30].any()
    with pytest.raises(ValueError, match="outside"):
        kp.top_newest(scores, 41)
    assert kp.top_newest(torch.tensor([[3.0, 1.0, 3.0, 2.0]]), 2).tolist() == [[2, 0]]  # ties: newest first


def test_random_press_draws_anew_for_each_bounded_press():
    """The prompt-only press is the seed's draw; a bounded cache advances `calls`, so the same slots are not
    evicted every time (a fixed draw would keep, say, the first token for ever)."""
    k = torch.zeros(1, 2, 10, 4)
    p = kp.get_press("random", keep_tokens=4, seed=3)
    first = p.score(None, k, scale=1.0)
    assert torch.equal(first, kp.get_press("random", evict=0.5, seed=3).score(None, k, scale=1.0))
    p.calls = 1
    assert not torch.equal(first, p.score(None, k, scale=1.0))


# ---- per-head budgets (AdaKV) ------------------------------------------------------------------------------------
def test_adakv_allocation_on_hand_made_scores():
    """Head 0's scores all beat head 1's: head 1 keeps only its safeguard (ceil(alpha x keep)), head 0 the rest;
    the layer's total is exactly keep x heads, and each head's slots list its kept positions in order."""
    s = torch.tensor([[[9.0, 8, 7, 6, 5, 4], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]]])
    chosen = kp.allocate(s, keep=3, alpha=0.67)  # the safeguard: int(0.67 x 3) = 2 per head
    assert chosen.sum().item() == 6 and chosen.sum(-1).tolist() == [[4, 2]]
    assert chosen[0, 0].nonzero().flatten().tolist() == [0, 1, 2, 3] and chosen[0, 1].nonzero().flatten().tolist() == [4, 5]
    idx, valid = kp._head_slots(chosen)
    assert idx.tolist() == [[[0, 1, 2, 3], [4, 5, 5, 5]]] and valid.tolist() == [[[True] * 4, [True, True, False, False]]]
    even = kp.allocate(s, keep=3, alpha=1.0)  # alpha 1: every head its own top-3, the plain press
    assert even.sum(-1).tolist() == [[3, 3]] and even[0, 1].nonzero().flatten().tolist() == [3, 4, 5]
    with pytest.raises(attnlab.AttnlabError, match="alpha must be in"):
        kp.get_press("adakv_h2o", evict=0.5, alpha=-0.1)
    none = kp.allocate(s, keep=2, alpha=0.0)  # no safeguard: head 1 may get nothing, and its slots stay in range
    assert none.sum(-1).tolist() == [[4, 0]]
    idx, valid = kp._head_slots(none)
    assert (idx < 6).all() and not valid[0, 1].any()


def test_adakv_cache_masks_the_slots_a_head_does_not_keep(tiny):
    """alpha=1 gives the plain press exactly (same kept indices, same logits through the masked sdpa path); with
    alpha=0.2 the per-layer totals are exact, and the slots a head does not keep change nothing when their keys
    and values are overwritten (masked), while unmasking them does change the output (the mask is doing work)."""
    ids = _ids(40)
    for name in ("snapkv", "h2o"):
        c1, k1, _ = kp.prefill(tiny, ids[:, :24], kp.get_press(name, evict=0.5))
        c2, k2, _ = kp.prefill(tiny, ids[:, :24], kp.get_press("adakv_" + name, evict=0.5, alpha=1.0))
        assert torch.equal(k1, k2)
        torch.testing.assert_close(kp.continue_scoring(tiny, c2, ids[:, 24:], start=24),
                                   kp.continue_scoring(tiny, c1, ids[:, 24:], start=24), atol=1e-5, rtol=1e-4)
    # a 4-token observation window: SnapKV's default 32 covers the whole 24-token prompt (every score +inf, no
    # head preferring any key: the newest 12 in each)
    press = kp.get_press("adakv_snapkv", evict=0.5, alpha=0.2, window=4)
    cache, kept, _ = kp.prefill(tiny, ids[:, :24], press)
    masks = cache.attnlab_key_masks
    assert all(m.sum().item() == 12 * m.shape[1] for m in masks)  # keep 12 of 24, per KV head on average
    assert any(not m.all() for m in masks), "the heads should differ in their counts here"
    assert (kept >= -1).all() and all(((kept[i] >= 0) == torch.nn.functional.pad(
        m, (0, kept.shape[-1] - m.shape[-1]), value=False)).all() for i, m in enumerate(masks))
    base = kp.continue_scoring(tiny, cache, ids[:, 24:], start=24)
    cache2, _, _ = kp.prefill(tiny, ids[:, :24], press)
    for layer, m in zip(cache2.layers, cache2.attnlab_key_masks):
        layer.keys = layer.keys.masked_fill(~m[..., None], 7.0)
        layer.values = layer.values.masked_fill(~m[..., None], -9.0)
    torch.testing.assert_close(kp.continue_scoring(tiny, cache2, ids[:, 24:], start=24), base, atol=1e-5, rtol=1e-4)
    cache2.attnlab_key_masks = [torch.ones_like(m) for m in cache2.attnlab_key_masks]
    assert (kp.continue_scoring(tiny, cache2, ids[:, 24:], start=24) - base).abs().max() > 1e-3
    assert kp.generate(tiny, ids[:, :24], press, 4).shape == (1, 4)  # decoding on the masked cache runs
    with pytest.raises(attnlab.AttnlabError, match="press the prompt once"):
        kp.stream(tiny, ids, kp.get_press("adakv_snapkv", keep_tokens=16), chunk=8)


def test_pyramid_budgets_sum_to_the_plain_total_and_run(tiny):
    """PyramidKV: lower layers keep more, the total over the layers is exactly the plain press's, every head of a
    layer keeps the same count, and slope 0 is the plain press (same logits)."""
    pyr = kp.get_press("pyramid_snapkv", evict=0.5, slope=0.5)
    b = pyr.layer_budgets(10, 5, 100)
    assert b == sorted(b, reverse=True) and sum(b) == 50 and b[0] == 15 and b[-1] == 5
    assert kp.get_press("pyramid_h2o", evict=0.5, slope=0.3).layer_budgets(7, 4, 100) == [9, 8, 6, 5]
    assert pyr.layer_budgets(80, 3, 100) == [100, 80, 60]  # the bottom capped at the prompt, the total kept
    ids = _ids(40)
    cache, kept, _ = kp.prefill(tiny, ids[:, :24], kp.get_press("pyramid_snapkv", evict=0.5, slope=0.5))
    lengths = [lay.keys.shape[-2] for lay in cache.layers]
    assert lengths == [18, 6] and all(m.all() for m in cache.attnlab_key_masks)  # 12 x (1.5, 0.5): every slot kept
    assert kp.continue_scoring(tiny, cache, ids[:, 24:], start=24).isfinite().all()
    flat, _, _ = kp.prefill(tiny, ids[:, :24], kp.get_press("snapkv", evict=0.5))
    zero, _, _ = kp.prefill(tiny, ids[:, :24], kp.get_press("pyramid_snapkv", evict=0.5, slope=0.0))
    torch.testing.assert_close(kp.continue_scoring(tiny, zero, ids[:, 24:], start=24),
                               kp.continue_scoring(tiny, flat, ids[:, 24:], start=24), atol=1e-5, rtol=1e-4)


def test_cli_prompt_length_follows_the_sequence_length(tiny_lm_dir, tmp_path):
    import attnlab.cli

    out = tmp_path / "out"
    assert attnlab.cli.main(["press", "--model", str(tiny_lm_dir), "--seq-len", "48", "--num-examples", "1",
                             "--evict", "0.5", "--presses", "streaming_llm", "--no-progress", "--no-plot",
                             "--out", str(out)]) == 0
    assert json.loads((out / "press.json").read_text())["prompt_len"] == 42  # 7/8 of 48, where 1792 was refused


def test_cli_says_when_snapkv_keeps_less_than_its_window(tiny_lm_dir, tmp_path, capsys):
    """40 prompt tokens kept whole: above SnapKV's 32-token window, but pyramid_'s top layer keeps half (slope 0.5)."""
    import attnlab.cli

    base = ["press", "--model", str(tiny_lm_dir), "--seq-len", "48", "--prompt-len", "40", "--num-examples", "1",
            "--evict", "0", "--no-progress", "--no-plot"]
    for presses, said in (("snapkv", False), ("pyramid_snapkv", True)):
        assert attnlab.cli.main([*base, "--presses", presses, "--out", str(tmp_path / presses)]) == 0
        assert ("observation window (in some layer" in capsys.readouterr().out) == said
