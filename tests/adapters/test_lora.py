"""Low-rank adapters on the swapped layers' projections (adapters/lora.py): untrained they change nothing; trained
they move only the swapped forward, never the teacher under `original(...)`, never the model after `unswap`; they
save and load with the method; no causal leak; bad requests are one clear error before anything changes."""
from __future__ import annotations

import pytest
import torch

import attnlab
from attnlab.adapters.spec import Rule, SwapSpec
from attnlab.types import AttnlabError, UnsupportedError
from tests.adapters import max_diff, outputs, rand_ids, tiny_model
from tests.adapters.test_hf import LEAK_AT, LEAK_T, assert_no_leak, attnlab_leftovers, perturbed_pair


def _perturb_adapters(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _, m in attnlab.adapters.method_modules(model):
        for b in m.lora.B.values():
            b.data.copy_(torch.randn(b.shape, generator=g))


@pytest.mark.parametrize("kind,method,projs", [("llama", "window", {"q_proj", "k_proj", "v_proj", "o_proj"}),
                                               ("bert", "dense", {"query", "key", "value"})])
def test_adapters_start_exact_move_only_the_swapped_forward_and_round_trip(kind, method, projs, tmp_path):
    model = tiny_model(kind)
    ids = rand_ids(2, 16)
    base = outputs(model, ids)
    opts = {"window": 4, "sinks": 1} if method == "window" else {}
    with attnlab.swapped(model, method, **opts):
        plain = outputs(model, ids)
    spec = SwapSpec([Rule("*", method, opts, lora=4)])
    attnlab.swap(model, spec)
    mods = attnlab.adapters.method_modules(model)
    assert set(mods[0][1].lora.A.keys()) == projs
    assert torch.equal(outputs(model, ids), plain)  # B = 0: exactly the method without adapters
    _perturb_adapters(model)
    adapted = outputs(model, ids)
    assert max_diff(adapted, plain) > 1e-2
    with attnlab.original(model):
        assert torch.equal(outputs(model, ids), base)  # the teacher: no adapter, no method
    assert torch.equal(outputs(model, ids), adapted)
    attnlab.save(model, tmp_path / "att")
    fresh = tiny_model(kind)
    attnlab.load(fresh, tmp_path / "att")
    assert torch.equal(outputs(fresh, ids), adapted)
    assert attnlab.swapped_spec(fresh).to_dict()["rules"][0]["lora"] == 4
    attnlab.unswap(model)
    assert torch.equal(outputs(model, ids), base)  # hooks gone
    assert attnlab_leftovers(model) == [] and not any(p._forward_hooks for p in model.modules())


def test_adapters_train_by_gradient_and_leak_nothing():
    model = tiny_model("llama")
    attnlab.swap(model, SwapSpec([Rule("*", "window", {"window": 4, "sinks": 1}, lora=2)]))
    params = [p for _, m in attnlab.adapters.method_modules(model) for p in m.parameters()]
    assert len(params) == 2 * 8  # A and B for 4 projections, 2 layers; window itself has none
    model(rand_ids(1, 16)).logits.pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if "lora" in n}
    assert all(g is not None for n, g in grads.items() if ".B." in n)  # B gets a gradient at init (A does not: B = 0)
    assert any(g.abs().max() > 0 for n, g in grads.items() if ".B." in n)
    _perturb_adapters(model)
    ids, ids2 = perturbed_pair(LEAK_T, LEAK_AT, 128)
    assert_no_leak(model, ids, ids2, LEAK_AT)


def test_bad_lora_requests_are_refused_before_anything_changes():
    model = tiny_model("llama")
    for rank, match in ((-1, "rank >= 0"), (True, "rank >= 0"), (1.5, "rank >= 0"), (100, "exceeds")):
        with pytest.raises((AttnlabError, UnsupportedError), match=match):
            attnlab.swap(model, SwapSpec([Rule("*", "window", {"window": 4}, lora=rank)]))
        assert attnlab.swapped_spec(model) is None and attnlab_leftovers(model) == []
    with pytest.raises(AttnlabError, match="not on ones that keep"):
        attnlab.swap(model, SwapSpec([Rule("*", "original", {}, lora=2)]))
    layer = torch.nn.TransformerEncoderLayer(32, 4, dim_feedforward=64, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    with pytest.raises(UnsupportedError, match="fused input projection"):
        attnlab.swap(enc, SwapSpec([Rule("*", "dense", {}, lora=2)]))
    spec = SwapSpec.from_dict({"rules": [{"layers": "*", "method": "window", "options": {}, "lora": 3}]})
    assert spec.rules[0].lora == 3 and "lora 3" in spec.describe()
    assert "lora" not in SwapSpec.of("window").to_dict()["rules"][0]  # old specs and checkpoints compare equal


def test_the_delta_is_scale_x_a_b_and_the_init_follows_the_spec_seed():
    model = tiny_model("llama")
    spec = SwapSpec([Rule("*", "window", {"window": 4}, lora=2)], seed=3)
    attnlab.swap(model, spec)
    attn = attnlab.adapters.attention_modules(model)[0][1]
    lora = attnlab.adapters.method_modules(model)[0][1].lora
    first = {k: a.detach().clone() for k, a in lora.A.items()}
    _perturb_adapters(model)
    x = torch.randn(3, 32)
    want = attn.q_proj.weight @ x.t()
    want = want.t() + (x @ lora.A["q_proj"].t()) @ lora.B["q_proj"].t() * 2.0  # alpha = 2 x rank: scale 2
    assert lora.scale == 2.0
    with torch.no_grad():
        torch.testing.assert_close(attn.q_proj(x), want)
    attnlab.unswap(model)
    attnlab.swap(model, spec)  # the same spec: the same adapters, whatever the global random state did
    again = attnlab.adapters.method_modules(model)[0][1].lora
    assert all(torch.equal(first[k], again.A[k]) for k in first)
    attnlab.unswap(model)
    attnlab.swap(model, SwapSpec(spec.rules, seed=4))
    assert not torch.equal(first["q_proj"], attnlab.adapters.method_modules(model)[0][1].lora.A["q_proj"])


def test_a_deep_copy_has_its_own_adapters_and_a_swapped_model_pickles():
    import copy
    import io

    model = tiny_model("llama")
    ids = rand_ids(1, 12)
    base = outputs(model, ids)
    attnlab.swap(model, SwapSpec([Rule("*", "window", {"window": 4}, lora=2)]))
    _perturb_adapters(model)
    adapted = outputs(model, ids)
    twin = copy.deepcopy(model)
    assert torch.equal(outputs(twin, ids), adapted)
    with attnlab.original(twin):
        assert torch.equal(outputs(twin, ids), base)  # the copy's own swap state switches the copy's hooks
    for _, m in attnlab.adapters.method_modules(twin):
        for b in m.lora.B.values():
            b.data.zero_()
    assert max_diff(outputs(twin, ids), adapted) > 1e-2  # the copy's adapters, not the original's
    assert torch.equal(outputs(model, ids), adapted)
    torch.save(model, io.BytesIO())
