"""Column-sum token pruning: the received-attention score against the dense matrix, token selection, pruning
inside the forward against a hand-run reference (positions preserved), prompt compression, the CLI."""
from __future__ import annotations

import json

import pytest
import torch

import attnlab
from attnlab.ops.reference import received_attention
from attnlab.reduction import token_prune as tp
from tests.helpers import assert_cli_one_line_error


@pytest.mark.parametrize("causal", [False, True])
def test_received_attention_equals_the_dense_matrix(causal):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 10, 8, generator=g), torch.randn(2, 3, 10, 8, generator=g)
    kpm = torch.ones(2, 10, dtype=torch.bool)
    kpm[1, 7:] = False
    got = received_attention(q, k, scale=8 ** -0.5, causal=causal, key_padding_mask=kpm, chunk=3)
    s = (q @ k.transpose(-1, -2)) * 8 ** -0.5
    allowed = kpm[:, None, None, :] & kpm[:, None, :, None]  # padded queries count for nothing either
    if causal:
        allowed = allowed & torch.ones(10, 10, dtype=torch.bool).tril()
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    n_i = allowed.sum(-1, keepdim=True).float()  # keys each query sees
    want = (p * n_i).mean(1).sum(1) / allowed[:, 0].sum(1).clamp_min(1)  # / queries that see each key
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert (got[1, 7:] == 0).all()
    plain = received_attention(q, k, scale=8 ** -0.5, causal=causal, key_padding_mask=kpm, chunk=3, normalise=False)
    torch.testing.assert_close(plain, p.mean(1).sum(1), atol=1e-6, rtol=1e-5)  # H2O's accumulated attention
    uniform = received_attention(torch.zeros(1, 2, 6, 4), torch.randn(1, 2, 6, 4), scale=1.0, causal=causal)
    torch.testing.assert_close(uniform, torch.ones(1, 6))  # uniform attention scores 1 everywhere


def test_select_tokens_counts_specials_padding_and_order():
    scores = torch.tensor([[0.1, 5.0, 0.2, 4.0, 0.3, 3.0], [9.0, 1.0, 2.0, 3.0, 0.0, 0.0]])
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]).bool()
    always = torch.tensor([[1, 0, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0]]).bool()
    kept = tp.select_tokens(scores, 0.5, real=real, always=always)
    assert kept.index[0].tolist() == [0, 1, 5] and kept.valid[0].all()  # 2 specials + the best other one
    assert kept.index[1][kept.valid[1]].tolist() == [0, 3] and kept.counts.tolist() == [3, 2]  # padding never kept
    thr = tp.select_tokens(scores, threshold=2.5, real=real)
    assert thr.index[0][thr.valid[0]].tolist() == [1, 3, 5] and thr.index[1][thr.valid[1]].tolist() == [0, 3]
    none = tp.select_tokens(torch.zeros(1, 4), threshold=10.0)
    assert none.counts.tolist() == [1]  # nothing above the threshold: the best token stays
    with pytest.raises(attnlab.AttnlabError, match="exactly one of"):
        tp.select_tokens(scores, 0.5, threshold=1.0)
    with pytest.raises(attnlab.AttnlabError, match=r"fraction in \(0, 1\]"):
        tp.select_tokens(scores, 1.5)


def _reference_pruned_llama(model, ids, after, kept_index):
    """Llama by hand: layers 0..after on every token, then only the kept ones at their own positions."""
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(ids.shape[1])[None]
    cos_sin = inner.rotary_emb(h, pos)
    for i, layer in enumerate(inner.layers):
        if i == after + 1:
            h = h[:, kept_index]
            pos = pos[:, kept_index]
            cos_sin = inner.rotary_emb(h, pos)
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=cos_sin)
        h = out[0] if isinstance(out, tuple) else out
    return model.lm_head(inner.norm(h))


@pytest.mark.parametrize("technique", ["random", "last"])
def test_pruning_inside_a_causal_lm_equals_the_hand_run_reference(technique):
    """Kept tokens keep their positions (rotary) and see only the kept tokens after the pruning layer."""
    from tests.adapters import tiny_model

    model = tiny_model("llama", num_hidden_layers=3).eval()
    ids = torch.randint(0, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), tp.TokenPruner(model, keep=0.5, after=[0], technique=technique, seed=3) as pruner:
        out, kept = pruner(input_ids=ids)
        ref = _reference_pruned_llama(model, ids, 0, kept.index[0])
    assert kept.counts.tolist() == [12] and attnlab.swapped_spec(model) is None  # the swap is undone on exit
    if technique == "last":
        assert kept.index[0].tolist() == list(range(12, 24))
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=1e-4)


def test_random_pruning_follows_the_seed_and_draws_anew_for_each_batch():
    """The same seed keeps the same tokens on a rerun; another seed, or the next batch of one run, others (a
    generator re-seeded per call dropped the same positions from every batch of a shape)."""
    from tests.adapters import tiny_model

    model = tiny_model("llama", num_hidden_layers=3).eval()
    ids = torch.randint(0, 100, (1, 32), generator=torch.Generator().manual_seed(0))

    def kept(seed, calls=1):
        with torch.no_grad(), tp.TokenPruner(model, keep=0.5, after=[0], technique="random", seed=seed) as pruner:
            return [pruner(input_ids=ids)[1].index[0].tolist() for _ in range(calls)]

    first, second = kept(3, calls=2)
    assert kept(3) == [first] and first != second and kept(4) != [first]


def test_pruning_an_encoder_keeps_specials_pads_rows_and_is_exact_at_keep_1(minilm):
    model, tok = minilm
    enc = tok(["the quick brown fox jumps over the lazy dog again", "short one"], padding=True,
              return_tensors="pt", return_special_tokens_mask=True)
    special = enc.pop("special_tokens_mask")
    with torch.no_grad():
        base = model(**enc).last_hidden_state
        with tp.TokenPruner(model, keep=1.0, after=[2]) as pruner:
            out, kept = pruner(special=special, **enc)
        full = base.gather(1, kept.index[..., None].expand(-1, -1, base.shape[-1]))
        torch.testing.assert_close(out.last_hidden_state[kept.valid], full[kept.valid], atol=1e-5, rtol=1e-4)
        with tp.TokenPruner(model, keep=0.25, after=[1, 3]) as pruner:  # progressive: 0.5 at each stage
            out, kept = pruner(special=special, **enc)
    real = enc["attention_mask"].sum(-1)
    assert out.last_hidden_state.shape[1] == kept.index.shape[1] == int(kept.counts.max())
    assert kept.counts[0] < real[0] // 2 + 2 and kept.counts[1] <= real[1]
    for row in range(2):  # [CLS] and [SEP] survive both stages
        ids = enc["input_ids"][row][kept.index[row][kept.valid[row]]].tolist()
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert torch.isfinite(out.last_hidden_state).all()


def test_spam_timing_counts_the_model_not_the_tokenizer(minilm, monkeypatch):
    """`seconds` is the model's passes over pre-tokenized batches: the tokenizer is never called between a timed
    region's two clock reads (the module's only perf_counter calls: odd calls open a region, even ones close it).
    Checked by the clock's order, not by durations: a duration bound failed in a CI run on a loaded CPU."""
    import types

    model, tok = minilm
    state = {"reads": 0, "inside": False, "calls": 0}

    def perf_counter():
        state["reads"] += 1
        state["inside"] = state["reads"] % 2 == 1
        return float(state["reads"])

    monkeypatch.setattr(tp, "time", types.SimpleNamespace(perf_counter=perf_counter))

    class WatchedTokenizer:
        def __call__(self, *a, **k):
            assert not state["inside"], "the tokenizer ran inside a timed region"
            state["calls"] += 1
            return tok(*a, **k)

    items = [(f"message number {i} about cheap pills and meetings", i % 2) for i in range(24)]
    rows = tp.evaluate_spam(model, WatchedTokenizer(), items, items, keeps=[0.5], techniques=("first",), seq_len=32,
                            batch_size=8, progress=False, timing_repeats=1)
    assert state["calls"] == 6 and state["reads"] == 4  # train and test tokenized once (3 batches each); 2 regions
    assert all(r["seconds"] == 1.0 for r in rows)  # each region: one read to the next
    assert rows[1]["speedup"] == rows[0]["seconds"] / rows[1]["seconds"]


def test_prompt_compression_is_exact_when_everything_is_kept_and_attention_beats_random(smollm2):
    model, tok = smollm2
    from attnlab.train.data import eval_windows

    windows = eval_windows(tok, None, 192, 1)
    rows = tp.evaluate_prompt(model, windows, prompt_len=128, keeps=[1.0, 0.9, 0.5],
                              techniques=("attention", "random", "first"), progress=False)
    by = {(r["technique"], r["keep"]): r for r in rows}
    for tech in ("attention", "random", "first"):
        assert by[(tech, 1.0)]["kl"] < 1e-6 and by[(tech, 1.0)]["kept_fraction"] == 1.0
    assert by[("attention", 0.5)]["kl"] < by[("random", 0.5)]["kl"]
    # the continuation sees the kept prompt across the gap in positions (transformers reads a position jump with
    # no attention mask as a new packed sequence: then every "first" row would be the same, the prompt unseen)
    assert by[("first", 0.9)]["kl"] < 0.8 * by[("first", 0.5)]["kl"]
    assert by[("attention", 0.5)]["kv_bytes"] == by[("original", 1.0)]["kv_bytes"] // 2


@pytest.mark.parametrize("args,match", [
    (["--keep", "0"], "--keep values must be in (0, 1]"),
    (["--keep", "x"], "--keep expects numbers"),
    (["--techniques", "nope"], "unknown"),
    (["--threshold", "1.0"], "attention technique only"),
    (["--after", "9"], "the model has 6 layers"),
    (["--task", "lm", "--model", "minilm"], "needs a causal LM"),
    (["--task", "lm", "--prompt-len", "600"], "--prompt-len 600"),
    (["--model", "/no/such"], "neither a packaged model"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--seq-len", "1024"], "--seq-len 1024 exceeds the model's max_position_embeddings=512"),  # an encoder too
    (["--keep", "0.5", "--threshold", "1", "--techniques", "attention"], "--keep and --threshold both choose"),
    (["--task", "lm", "--after", "3"], "--after: for --task spam only"),
    (["--task", "lm", "--head", "pruned", "--batch-size", "4"], "--head, --batch-size: for --task spam only"),
    (["--prompt-len", "100"], "--prompt-len: for --task lm only"),
])
def test_cli_bad_input_is_one_line(args, match, tmp_path, capsys, monkeypatch):
    import attnlab.models

    monkeypatch.setattr(attnlab.models, "load", lambda *a, **k: pytest.fail("the model loaded before the check"))
    assert_cli_one_line_error(["prune", *args, "--out", str(tmp_path / "out")], match, capsys, tmp_path / "out")


def test_cli_spam_and_lm_end_to_end(minilm, tiny_lm_dir, tmp_path, capsys):
    import attnlab.cli

    out = tmp_path / "spam"
    assert attnlab.cli.main(["prune", "--task", "spam", "--num-examples", "24", "--seq-len", "64", "--keep", "1,0.5",
                             "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "prune.json").read_text())
    rows = {(r["technique"], r["keep"]): r for r in res["rows"]}
    assert rows[("attention", 1.0)]["accuracy"] == rows[("original", 1.0)]["accuracy"]
    assert 0.4 < rows[("first", 0.5)]["kept_fraction"] < 0.7 and (out / "prune.png").stat().st_size > 10_000
    assert all(r["seconds"] > 0 and r["batch_size"] == 32 for r in res["rows"])
    out = tmp_path / "spam-pruned-head"  # the head fitted on pruned embeddings: at keep 1 the same features and head
    assert attnlab.cli.main(["prune", "--task", "spam", "--num-examples", "24", "--seq-len", "64", "--keep", "1,0.5",
                             "--techniques", "attention", "--head", "pruned", "--no-progress", "--no-plot",
                             "--out", str(out)]) == 0
    res = json.loads((out / "prune.json").read_text())
    again = {(r["technique"], r["keep"]): r for r in res["rows"]}
    assert res["setup"]["head"] == "pruned" and {r["head"] for r in res["rows"]} == {"pruned"}
    assert again[("attention", 1.0)]["accuracy"] == again[("original", 1.0)]["accuracy"]
    assert again[("attention", 0.5)]["kept_fraction"] == rows[("attention", 0.5)]["kept_fraction"]
    runs = {}  # --seed is recorded (test_random_pruning_follows_the_seed: that it is used)
    for seed in (0, 7):
        out = tmp_path / f"spam-seed{seed}"
        assert attnlab.cli.main(["prune", "--task", "spam", "--num-examples", "24", "--seq-len", "64", "--keep", "0.5",
                                 "--techniques", "random", "--seed", str(seed), "--head", "pruned", "--no-progress",
                                 "--no-plot", "--out", str(out)]) == 0
        runs[seed] = json.loads((out / "prune.json").read_text())
        assert runs[seed]["setup"]["seed"] == seed
    out = tmp_path / "lm"
    assert attnlab.cli.main(["prune", "--task", "lm", "--model", str(tiny_lm_dir), "--seq-len", "48", "--prompt-len",
                             "32", "--num-examples", "1", "--keep", "0.5", "--no-progress", "--out", str(out)]) == 0
    res = json.loads((out / "prune.json").read_text())
    assert {r["technique"] for r in res["rows"]} == {"original", *tp.PROMPT_TECHNIQUES}
    assert all(r["kept_fraction"] == 0.5 for r in res["rows"][1:])
    by = {r["technique"]: r for r in res["rows"]}
    assert all(by[t]["score_ms"] > 0 for t in ("attention", "accumulated", "h2o"))  # the scoring forward, timed
    assert all(by[t]["score_ms"] == 0 for t in ("original", "random", "first", "last"))
    assert "KV MiB" in capsys.readouterr().out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_bytes_are_the_cache_the_model_holds(dtype):
    from attnlab.reduction import kv_press, token_prune
    from tests.adapters import tiny_model

    model = tiny_model("llama").to(dtype)
    with torch.no_grad():
        cache = model(torch.randint(0, 100, (1, 12)), use_cache=True).past_key_values
    assert token_prune.kv_bytes(model, 12) == kv_press.kv_bytes(cache)  # prune and press report the same bytes
