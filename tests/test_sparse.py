"""attnlab.sparse: mask_mod factories, combinators, the BlockMask cache, the fallback's key chunks."""
from __future__ import annotations

import pytest
import torch

from attnlab import sparse


def test_factories_match_hand_written_masks():
    i, j = torch.arange(9)[:, None], torch.arange(12)[None, :]
    off = 12 - 9
    torch.testing.assert_close(sparse.dense_mask(sparse.causal(off), 9, 12), j <= i + off)
    torch.testing.assert_close(sparse.dense_mask(sparse.sliding_window(2, off), 9, 12), (i + off - j).abs() <= 2)
    torch.testing.assert_close(sparse.dense_mask(sparse.attention_sinks(3), 9, 12), (j < 3).expand(9, 12))
    lay = torch.tensor([[1, 0, 0], [0, 1, 1], [1, 0, 1]], dtype=torch.bool)
    want = lay.repeat_interleave(4, 0).repeat_interleave(4, 1)[:9, :12]
    torch.testing.assert_close(sparse.dense_mask(sparse.block_layout(lay, 4), 9, 12), want)
    streaming = sparse.and_masks(sparse.or_masks(sparse.sliding_window(2, off), sparse.attention_sinks(1)),
                                 sparse.causal(off))
    torch.testing.assert_close(sparse.dense_mask(streaming, 9, 12), (((i + off - j).abs() <= 2) | (j < 1)) & (j <= i + off))


def test_key_padding_mask_mod_is_batch_specific():
    kpm = torch.tensor([[True, True, False], [False, True, True]])
    mod = sparse.key_padding(kpm)
    b = torch.tensor([0, 1])[:, None]
    kv = torch.arange(3)[None, :]
    torch.testing.assert_close(mod(b, 0, 0, kv), kpm)


def test_block_mask_is_cached_per_key():
    calls = []

    def make(dev):
        calls.append(dev)
        return sparse.sliding_window(3, 0, dev)

    a = sparse.block_mask(("test-window", 3), make, None, None, 40, 40, "cpu", 16)
    b = sparse.block_mask(("test-window", 3), make, None, None, 40, 40, "cpu", 16)
    c = sparse.block_mask(("test-window", 3), make, None, None, 41, 41, "cpu", 16)
    assert a is b and a is not c and len(calls) == 2
    # the BlockMask skips blocks beyond the band: with 16-wide blocks and window 3, rows see <= 3 blocks
    assert int(a.kv_num_blocks.max()) <= 3
    assert sparse.layout_key(torch.eye(3, dtype=torch.bool)) == sparse.layout_key(torch.eye(3) > 0)
    assert sparse.layout_key(torch.eye(3, dtype=torch.bool)) != sparse.layout_key(torch.ones(3, 3, dtype=torch.bool))


@pytest.mark.parametrize("tq,tk,window,sinks,causal", [(200, 200, 5, 3, True), (200, 200, 70, 0, False),
                                                       (30, 200, 4, 2, True), (200, 30, 4, 0, True)])
def test_band_chunks_reach_every_visible_key_and_stay_small(tq, tk, window, sinks, causal):
    mod = sparse.sliding_window(window, tk - tq)
    if sinks:
        mod = sparse.or_masks(mod, sparse.attention_sinks(sinks))
    if causal:
        mod = sparse.and_masks(mod, sparse.causal(tk - tq))
    full = sparse.dense_mask(mod, tq, tk)
    seen = torch.zeros(tq, tk, dtype=torch.bool)
    for s, e, kidx in sparse.band_chunks(tq, tk, window=window, sinks=sinks, causal=causal, device="cpu"):
        assert len(set(kidx.tolist())) == len(kidx)  # no key twice (it would be double counted)
        assert len(kidx) <= (e - s) + 2 * window + sinks + 1  # O(chunk + window), not O(T)
        seen[s:e, kidx] = True
    assert not (full & ~seen).any()


def test_layout_chunks_cover_kept_blocks():
    lay = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    chunks = list(sparse.layout_chunks(lay, 10, 10, 4, causal=False, device="cpu"))
    assert [c[:2] for c in chunks] == [(0, 4), (4, 8), (8, 10)]
    assert chunks[0][2].tolist() == [0, 1, 2, 3, 8, 9]
    assert chunks[1][2].tolist() == [4, 5, 6, 7]
    causal = list(sparse.layout_chunks(lay, 10, 10, 4, causal=True, device="cpu"))
    assert causal[0][2].tolist() == [0, 1, 2, 3]  # block 2 lies wholly in the future of queries 0..3


def test_backend_resolution_and_availability(monkeypatch):
    assert sparse.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert sparse.resolve_backend("flex", torch.device("cpu")) == "flex"
    assert sparse.flex_unavailable_reason(torch.device("cpu")) is None
    monkeypatch.setattr(sparse, "TORCH_VERSION", (2, 5))
    assert "torch >= 2.6" in sparse.flex_unavailable_reason(torch.device("cpu"))
    assert sparse.flex_unavailable_reason(torch.device("cpu")).endswith("use backend='torch'")
