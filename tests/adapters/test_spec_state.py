"""Per-layer swap specs, `original(...)` on the same weights, and save / load of trained attention state.

The round trip the distillation stands on: swap -> an optimiser step on the methods' parameters -> the model's
own attention under `original(...)` is bit-equal to the unswapped model -> after leaving it the trained outputs
are back -> save -> load into a fresh copy -> bit-equal outputs. On tiny seeded transformers models and on
`nn.MultiheadAttention` stacks; the real SmolLM2 runs the per-layer leak check.
"""
from __future__ import annotations

import json

import pytest
import torch

import attnlab
from attnlab.adapters.spec import Rule, SwapSpec, layer_seed
from tests.adapters import max_diff, outputs, rand_ids, tiny_model
from tests.adapters.test_hf import LEAK_AT, LEAK_T, assert_no_leak, attnlab_leftovers, leak_size, perturbed_pair


# ---- the spec as data --------------------------------------------------------------------------------------------
def test_selectors_and_last_match_wins():
    names = [f"model.layers.{i}.self_attn" for i in range(6)]
    spec = SwapSpec.of({"*": ("window", {"window": 4}), "0-1": "dense", "-1": "original", "model.layers.3.*": "linear"})
    plan = spec.plan(names)
    assert [p.method for p in plan] == ["dense", "dense", "window", "linear", "window", "original"]
    assert plan[2].options == {"window": 4}
    assert [p.index for p in plan] == list(range(6)) and plan[4].name == names[4]
    assert SwapSpec.of("window", window=3).plan(names[:2])[1].options == {"window": 3}
    assert SwapSpec.of(("window", {"window": 3})) == SwapSpec.of("window", window=3)  # a rule's value, every layer


def test_spec_json_round_trip_and_bad_specs():
    spec = SwapSpec([Rule("*", "performer", {"num_features": 8}), Rule("0,2", "dense")], seed=7)
    again = SwapSpec.from_json(spec.to_json())
    assert again == spec and json.loads(spec.to_json())["seed"] == 7
    with pytest.raises(attnlab.UnknownMethodError, match="nosuch"):
        SwapSpec.of({"*": "nosuch"}).validate()
    with pytest.raises(attnlab.OptionError, match="no option"):
        SwapSpec.of({"*": ("window", {"windw": 3})}).validate()
    with pytest.raises(attnlab.AttnlabError, match="matches none"):
        SwapSpec.of({"7": "dense"}).plan(["a", "b"])
    with pytest.raises(attnlab.AttnlabError, match="not a swap spec"):
        SwapSpec.from_dict({"rules": [{"layers": "*"}]})
    with pytest.raises(attnlab.AttnlabError, match="not valid JSON"):
        SwapSpec.from_json("{nope")


def test_at_length_fills_only_the_omitted_options_with_the_methods_defaults_there():
    spec = SwapSpec.of({"*": ("window", {"window": 32}), "0": "original", "1": "linear"}).at_length(128)
    window, original, linear = spec.rules
    assert window.options == {**attnlab.registry.defaults("window", 128), "window": 32}
    assert window.options["sinks"] == 4  # what --methods window --set window.window=32 builds at 128 tokens
    assert original.options == {} and linear.options == attnlab.registry.defaults("linear", 128)
    assert spec.at_length(128) == spec  # filled once: nothing more to fill
    assert SwapSpec.of("window").at_length(4096).rules[0].options["window"] == 256
    # a default that depends on a given option sees it: blocks of 4 still cover the length
    lm = SwapSpec.of("learned_mask", block_size=4).at_length(512).rules[0].options
    assert lm["block_size"] == 4 and lm["max_blocks"] * 4 >= 512
    lin = SwapSpec.of("linformer", init="identity", proj_len=64).at_length(512).rules[0].options
    assert lin["max_len"] == lin["proj_len"] == 64  # identity's limit, not a max_len it cannot be built with
    attnlab.make("linformer", head_dim=8, num_heads=2, **lin)


def test_check_refuses_what_swap_would_without_swapping():
    from attnlab.adapters.swap import check

    model = tiny_model("llama")
    with torch.device("meta"):
        skeleton = type(model)(model.config)  # no weights: what the commands check against before a load
    assert [p.method for p in check(skeleton, {"*": "window", "0": "original"})] == ["original", "window"]
    for target in (model, skeleton):
        with pytest.raises(attnlab.UnsupportedError, match="cannot do causal"):
            check(target, {"1": "linformer"})
        with pytest.raises(attnlab.AttnlabError, match="matches none"):
            check(target, {"5": "window"})
        with pytest.raises(attnlab.UnsupportedError, match="max_len=32 tokens; this run feeds 64"):
            check(target, {"*": ("learned_mask", {"block_size": 4, "max_blocks": 8})}, seq_len=64)
        check(target, {"*": ("learned_mask", {"block_size": 4, "max_blocks": 8})}, seq_len=32)
        check(target, "window")
        assert attnlab.adapters.swapped_spec(target) is None  # checked, not swapped
    with pytest.raises(attnlab.UnsupportedError, match="no torch.nn.MultiheadAttention"):
        check(torch.nn.Linear(2, 2), "window")
    enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(16, 2, batch_first=True), 2)
    with pytest.raises(attnlab.UnsupportedError, match="lora adapters need"):
        check(enc, SwapSpec.of("window").with_lora(2))
    assert [p.method for p in check(enc, "linear")] == ["linear", "linear"]


def test_random_methods_get_a_seed_per_layer_unless_one_is_asked_for():
    names = ["a", "b", "c"]
    seeds = [p.options["seed"] for p in SwapSpec.of("performer").plan(names)]
    assert len(set(seeds)) == 3 and seeds[0] == layer_seed(0, 0)
    assert [p.options["seed"] for p in SwapSpec.of("performer").with_seed(1).plan(names)] != seeds
    assert {p.options["seed"] for p in SwapSpec.of("performer", seed=5).plan(names)} == {5}
    assert "seed" not in SwapSpec.of("linear").plan(names)[0].options  # no seed option, none added
    model = tiny_model("llama")
    with attnlab.swapped(model, "performer", num_features=16):
        feats = [m.features for _, m in attnlab.adapters.method_modules(model)]
        assert not torch.equal(feats[0], feats[1])  # layers do not share random features
    with attnlab.swapped(model, "performer", num_features=16, seed=3):
        feats = [m.features for _, m in attnlab.adapters.method_modules(model)]
        assert torch.equal(feats[0], feats[1])


def test_swapped_spec_and_layers_report_what_runs():
    model = tiny_model("llama")
    assert attnlab.swapped_spec(model) is None
    spec = {"*": ("performer", {"num_features": 16}), "0": "original"}
    with attnlab.swapped(model, spec):
        got = attnlab.swapped_spec(model)
        assert got.to_dict() == SwapSpec.of(spec).to_dict()
        json.dumps(got.to_dict())  # plain data
        layers = attnlab.swapped_layers(model)
        assert [p.method for p in layers] == ["original", "performer"]
        mods = attnlab.attention_modules(model)
        assert not hasattr(mods[0][1], "attnlab_method") and hasattr(mods[1][1], "attnlab_method")
    assert attnlab_leftovers(model) == []


# ---- the round trip: train, original, save, load ------------------------------------------------------------------
def _one_step(model, ids, **kw):
    params = [p for _, m in attnlab.adapters.method_modules(model) for p in m.parameters()]
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.SGD(params, lr=0.5)
    out = model(ids, **kw)
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).pow(2).mean().backward()
    opt.step()
    return params


@pytest.mark.parametrize("kind,spec", [
    ("bert", {"*": ("linformer", {"max_len": 16, "proj_len": 8}), "1": ("nystrom", {"num_landmarks": 4, "conv_kernel": 3})}),
    ("llama", {"*": ("block_sparse", {"block_size": 4, "layout": [[True, False, False, False]] * 4})}),
])
def test_train_original_save_load_round_trip(kind, spec, tmp_path):
    model = tiny_model(kind)
    ids = rand_ids(2, 16)
    base = outputs(model, ids)
    attnlab.swap(model, spec)
    if kind == "llama":  # a per-head layout as trained state: the buffer changes, the spec does not
        for _, m in attnlab.adapters.method_modules(model):
            m.pattern.set_blocks(torch.eye(4, dtype=torch.bool))  # each block sees only itself
    else:
        _one_step(model, ids)
    trained = outputs(model, ids)
    assert max_diff(trained, base) > 1e-3
    with attnlab.original(model):
        assert torch.equal(outputs(model, ids), base)  # the model's own attention, bit for bit
        with attnlab.original(model):  # nesting is harmless
            pass
    assert torch.equal(outputs(model, ids), trained)  # the trained state survived
    attnlab.save(model, tmp_path / "att")
    fresh = tiny_model(kind)
    attnlab.load(fresh, tmp_path / "att")
    assert torch.equal(outputs(fresh, ids), trained)
    assert attnlab.swapped_spec(fresh).to_dict() == attnlab.swapped_spec(model).to_dict()
    attnlab.unswap(model)
    assert torch.equal(outputs(model, ids), base)


def test_per_layer_spec_on_tiny_llama_has_no_leak_and_original_layers_are_exact():
    model = tiny_model("llama")
    ids, ids2 = perturbed_pair(LEAK_T, LEAK_AT, 128)
    spec = {"*": ("window", {"window": 4, "sinks": 1}), "1": ("performer", {"num_features": 64})}
    with attnlab.swapped(model, spec):
        assert_no_leak(model, ids, ids2, LEAK_AT)
    base = outputs(model, ids)
    with attnlab.swapped(model, {"*": "original", "0": "dense"}):  # dense == original; layer 1 through the delegate
        assert max_diff(outputs(model, ids), base) <= 1e-5
    eager = tiny_model("llama", attn_implementation="eager")
    base = outputs(eager, ids)
    with attnlab.swapped(eager, {"*": "original", "1": "dense"}):  # the eager delegate gets a causal mask
        assert max_diff(outputs(eager, ids), base) <= 1e-5
        assert_no_leak(eager, ids, ids2, LEAK_AT)


@pytest.mark.model
def test_per_layer_spec_on_smollm2_has_no_leak(smollm2):
    model, tok = smollm2
    text = ("Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
            "and nothing particular to interest me on shore")
    base = tok(text, return_tensors="pt").input_ids[:, :LEAK_T]
    ids, ids2 = perturbed_pair(LEAK_T, LEAK_AT, model.config.vocab_size, base=base)
    spec = {"*": ("window", {"window": 4, "sinks": 1}), "0-14": ("performer", {"num_features": 64}), "29": "original"}
    with attnlab.swapped(model, spec):
        feats = [m.features for p, m in attnlab.adapters.method_modules(model) if p.method == "performer"]
        assert len(feats) == 15 and not torch.equal(feats[0], feats[1])
        past, future = leak_size(model, ids, ids2, LEAK_AT)
        print(f"\nSmolLM2 per-layer spec leak check: max |change| at <= t {past:.3e}, after t {future:.3e}")
        assert_no_leak(model, ids, ids2, LEAK_AT)
    assert attnlab_leftovers(model) == []


# ---- nn.MultiheadAttention stacks --------------------------------------------------------------------------------
def _encoder(seed=0):
    torch.manual_seed(seed)
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    return torch.nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()


def test_mha_per_layer_spec_shares_weights_original_and_save_load(tmp_path):
    enc = _encoder()
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = enc(x)
    before = {n: p for n, p in enc.named_parameters()}
    attnlab.swap(enc, {"*": ("linformer", {"max_len": 12, "proj_len": 4}), "1": "original"})
    assert [p.method for p in attnlab.swapped_layers(enc)] == ["linformer", "original", "linformer"]
    layer0 = enc.layers[0].self_attn
    assert isinstance(layer0, attnlab.nn.MultiheadAttention)
    assert layer0.in_proj_weight is before["layers.0.self_attn.in_proj_weight"]  # shared, not copied
    assert type(enc.layers[1].self_attn) is torch.nn.MultiheadAttention
    opt = torch.optim.SGD([p for _, m in attnlab.adapters.method_modules(enc) for p in m.parameters()], lr=0.5)
    enc(x).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        trained = enc(x)
        with attnlab.original(enc):
            assert type(enc.layers[0].self_attn) is torch.nn.MultiheadAttention
            assert torch.equal(enc(x), base)
        assert torch.equal(enc(x), trained)
    attnlab.save(enc, tmp_path / "mha")
    fresh = _encoder()
    attnlab.load(fresh, tmp_path / "mha")
    with torch.no_grad():
        assert torch.equal(fresh(x), trained)
    attnlab.unswap(enc)
    with torch.no_grad():
        assert torch.equal(enc(x), base)
    assert not hasattr(enc, "_attnlab_swap_state")


# ---- save / load errors: one clear error, nothing changed ---------------------------------------------------------
@pytest.fixture
def saved_llama(tmp_path):
    model = tiny_model("llama")
    attnlab.swap(model, "performer", num_features=16)
    attnlab.save(model, tmp_path / "att")
    return tmp_path / "att"


def _unchanged(model):
    return attnlab.swapped_spec(model) is None and attnlab_leftovers(model) == []


@pytest.mark.parametrize("case,match", [
    ("arch", "architecture 'LlamaForCausalLM'"),
    ("layers", "number of attention layers 2"),
    ("heads", r"\(heads, kv heads, head dim\)"),
])
def test_load_into_another_model_is_refused(saved_llama, case, match):
    other = {"arch": lambda: tiny_model("gpt2"), "layers": lambda: tiny_model("llama", num_hidden_layers=3),
             "heads": lambda: tiny_model("llama", num_key_value_heads=4)}[case]()
    with pytest.raises(attnlab.CheckpointError, match=match):
        attnlab.load(other, saved_llama)
    assert _unchanged(other)


def test_corrupt_missing_and_truncated_directories_are_refused(saved_llama, tmp_path):
    model = tiny_model("llama")
    with pytest.raises(attnlab.CheckpointError, match="does not exist"):
        attnlab.load(model, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(attnlab.CheckpointError, match="attnlab.json missing"):
        attnlab.load(model, tmp_path / "empty")
    st = saved_llama / "attention.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(attnlab.CheckpointError, match="corrupt or truncated"):
        attnlab.load(model, saved_llama)
    assert _unchanged(model)
    st.unlink()
    with pytest.raises(attnlab.CheckpointError, match="has no attention.safetensors"):
        attnlab.load(model, saved_llama)
    (saved_llama / "attnlab.json").write_text("{garbage")
    with pytest.raises(attnlab.CheckpointError, match="not JSON"):
        attnlab.load(model, saved_llama)
    assert _unchanged(model)


def test_load_onto_a_different_swap_is_refused_and_unknown_tensors_too(saved_llama):
    model = tiny_model("llama")
    with attnlab.swapped(model, "linear"):
        with pytest.raises(attnlab.CheckpointError, match="unswap"):
            attnlab.load(model, saved_llama)
    meta = json.loads((saved_llama / "attnlab.json").read_text())
    meta["spec"]["rules"] = [{"layers": "*", "method": "linear", "options": {}}]  # its layers hold no tensors
    (saved_llama / "attnlab.json").write_text(json.dumps(meta))
    with pytest.raises(attnlab.CheckpointError, match="no layer of the spec uses"):
        attnlab.load(model, saved_llama)
    assert _unchanged(model)


def test_save_replaces_a_directory_only_when_complete(tmp_path, monkeypatch):
    model = tiny_model("llama")
    attnlab.swap(model, "performer", num_features=16)
    good = attnlab.save(model, tmp_path / "att")
    before = (good / "attention.safetensors").read_bytes()
    import safetensors.torch

    def boom(*a, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        attnlab.save(model, tmp_path / "att")
    assert (good / "attention.safetensors").read_bytes() == before  # the good save is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["att"]  # no temporary left behind


def test_original_and_unswap_misuse():
    model = tiny_model("llama")
    with pytest.raises(attnlab.AttnlabError, match="nothing is swapped in"):
        with attnlab.original(model):
            pass
    with attnlab.swapped(model, "linear"):
        with attnlab.original(model):
            with pytest.raises(attnlab.AttnlabError, match="inside attnlab.original"):
                attnlab.unswap(model)
    assert _unchanged(model)


def test_saved_directory_as_a_swap_target(saved_llama):
    model = tiny_model("llama")
    ids = rand_ids(1, 8)
    ref = tiny_model("llama")
    attnlab.load(ref, saved_llama)
    with attnlab.swapped(model, attnlab.Saved(saved_llama)):
        assert torch.equal(outputs(model, ids), outputs(ref, ids))
    assert _unchanged(model)
