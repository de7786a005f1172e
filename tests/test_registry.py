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


# ---- discovery: a method is one file -------------------------------------------------------------------------------
TOY_METHOD = '''
"""A throwaway method written in one file: softmax attention with a temperature (the plugin test)."""
import dataclasses

import attnlab
from attnlab import masks
from attnlab.methods.base import AttentionMethod
from attnlab.types import Capabilities, opt


@attnlab.register("toy_softmax")
class ToySoftmax(AttentionMethod):
    """Plain softmax attention whose scores are divided by a temperature."""

    capabilities = Capabilities(causal=True, padding=True, probs=True)

    @dataclasses.dataclass
    class Options:
        temperature: float = opt(1.0, "divides the scores", low=1e-6)

    @classmethod
    def exact_limit(cls, tq, tk):
        return {"temperature": 1.0}

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs):
        self.kernel = "toy"
        allowed, _ = masks.combine(q.shape[-2], k.shape[-2], causal=causal, key_padding_mask=key_padding_mask,
                                   device=q.device)
        probs = masks.masked_softmax(q @ k.transpose(-1, -2) * (scale / self.opts.temperature), allowed)
        return probs.to(v.dtype) @ v, probs if need_probs else None
'''


@pytest.fixture(scope="module")
def toy_plugin(tmp_path_factory):
    """A package with one method file, installed the way a plugin is: an entry point in the "attnlab.methods"
    group of a distribution's metadata on sys.path."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "toy_attn").mkdir()
    (root / "toy_attn" / "__init__.py").write_text("")
    (root / "toy_attn" / "toy_softmax.py").write_text(TOY_METHOD)
    dist = root / "toy_attn-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-attn\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[attnlab.methods]\ntoy_softmax = toy_attn.toy_softmax\n")
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    return root, env


def test_a_plugin_method_file_appears_in_attnlab_list(toy_plugin):
    import subprocess
    import sys

    _, env = toy_plugin
    res = subprocess.run([sys.executable, "-m", "attnlab", "list"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "toy_softmax" in res.stdout and "divides the scores" in res.stdout
    assert "toy_softmax" not in attnlab.list_methods()  # only where the plugin is installed


def test_a_plugin_method_passes_the_conformance_suite(toy_plugin):
    import re
    import subprocess
    import sys
    from pathlib import Path

    _, env = toy_plugin
    repo = Path(__file__).resolve().parents[1]
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/methods/test_conformance.py",
                          "-k", "toy_softmax"], capture_output=True, text=True, env=env, cwd=repo, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    passed = int(re.search(r"(\d+) passed", res.stdout).group(1))
    assert passed >= 15, res.stdout[-1000:]  # every applicable check ran for it


def test_builtin_methods_are_found_by_file():
    """No list of method files anywhere: the registry finds every module of attnlab.methods."""
    import pkgutil

    import attnlab.methods

    files = {m.name for m in pkgutil.iter_modules(attnlab.methods.__path__) if not m.name.startswith("_") and m.name != "base"}
    found = {registry.get(n).__module__.rsplit(".", 1)[-1] for n in attnlab.list_methods()}
    assert files == found
