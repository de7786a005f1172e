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
    """(all-MiniLM-L6-v2 BertModel in eval mode, fp32; its tokenizer)."""
    return _load("minilm")
