"""Session fixtures: the real packaged models, each loaded ONCE per test session (SmolLM2 takes ~7 s).

Tests using them must leave them unmodified (swap only through `attnlab.swapped`).

Triton's CPU interpreter is switched on here, before anything imports triton (its own library functions are
built for the mode in force at import): with triton installed, the causal kernelised methods then run their
Triton kernels on CPU tensors wherever the shapes fit them (`_linear_core._use_triton`), as CUDA would."""
from __future__ import annotations

import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session", autouse=True)
def _interpreter_numpy_index():
    """Triton < 3.9's interpreter calls int() on 1-element arrays, an error from NumPy 2.4 (fixed in 3.9): every
    kernel run through it gets an __index__ that reads the one element (3.2 patches the tensor class in place,
    3.3-3.8 through a scope)."""
    try:
        import triton
        import triton.runtime.interpreter as interp
    except ImportError:
        yield
        return
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) >= (3, 9):
        yield
        return
    orig = interp._patch_lang_tensor

    def index(self):
        return int(self.handle.data.reshape(-1)[0])

    def patched(tensor, scope=None):
        if scope is None:
            orig(tensor)
            tensor.__index__ = index
        else:
            orig(tensor, scope)
            scope.set_attr(tensor, "__index__", index)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(interp, "_patch_lang_tensor", patched)
        yield


def _load(name: str):
    import attnlab.models

    if not attnlab.models.is_installed(name):
        pytest.skip(f"{attnlab.models.PACKAGED[name].replace('_', '-')} not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, tok = attnlab.models.load(name)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tok


@pytest.fixture(scope="session")
def smollm2():
    """(SmolLM2-135M-Instruct in eval mode, fp32, attn_implementation='sdpa'; its tokenizer)."""
    return _load("smollm2")


@pytest.fixture(scope="session")
def minilm():
    """(all-MiniLM-L6-v2 BertModel in eval mode, fp32; its tokenizer). Skipped under transformers 4, whose BertModel
    does not call the attention interface."""
    from tests.adapters import skip_bert_before_5

    skip_bert_before_5()
    return _load("minilm")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    """A tiny random Llama (hidden 32, 2 layers, GQA) saved with SmolLM2's real tokenizer: the CLI's real data
    path without the 135M model."""
    import shutil

    import attnlab.models
    from tests.adapters import tiny_model

    src = attnlab.models.smollm2_cache()
    if not (src / "tokenizer.json").exists():
        pytest.skip(f"SmolLM2 tokenizer not cached ({src} missing; attnlab.models.load('smollm2') creates it)")
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    vocab = len(AutoTokenizer.from_pretrained(src))
    tiny_model("llama", vocab_size=vocab, max_position_embeddings=512).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    return path
