import dataclasses

import pytest
import torch

import attnlab
from attnlab import registry
from attnlab.cli import main

EXPECTED = {"dense", "sdpa", "linear", "performer", "rfa", "linformer", "nystrom", "lsh", "window", "block_sparse"}


def test_every_issue_method_is_registered():
    assert EXPECTED <= set(attnlab.list_methods())


def test_capabilities_and_options_are_data():
    for name in attnlab.list_methods():
        caps = attnlab.capabilities(name)
        assert isinstance(caps, attnlab.Capabilities) and dataclasses.is_dataclass(caps)
        for opt, (_, help_) in attnlab.options(name).items():
            assert help_, f"{name}.{opt} has no help text"
    assert attnlab.capabilities("dense").probs and attnlab.capabilities("dense").causal


def test_unknown_method_lists_valid_names():
    with pytest.raises(attnlab.UnknownMethodError, match="valid methods:.*dense"):
        attnlab.make("flashy", head_dim=8, num_heads=2)


def test_unknown_option_lists_valid_options():
    with pytest.raises(attnlab.OptionError, match="valid options: backend"):
        attnlab.make("sdpa", head_dim=8, num_heads=2, landmarks=3)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        @registry.register("dense")
        class Other(attnlab.methods.AttentionMethod):  # noqa: F841
            pass


def test_gqa_heads_must_divide():
    with pytest.raises(attnlab.OptionError, match="must divide"):
        attnlab.make("dense", head_dim=8, num_heads=6, num_kv_heads=4)


def test_make_builds_an_nn_module_per_layer():
    a = attnlab.make("dense", head_dim=8, num_heads=2)
    b = attnlab.make("dense", head_dim=8, num_heads=2)
    assert isinstance(a, torch.nn.Module) and a is not b


def test_cli_list_prints_every_method(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in attnlab.list_methods():
        assert name in out
    assert main(["list", "--json"]) == 0
