"""Shared builders for the adapter tests: tiny, seeded, randomly initialised transformers models.

Every config has hidden size 32 and 2 layers, so a forward pass costs microseconds and the whole adapter
suite runs in well under a minute on 2 CPU cores. `initializer_range=0.2` (10x the default) makes the
random attention clearly non-uniform, so a wrong mask or a leak moves the outputs by O(0.1), far above
the 1e-4 / 1e-5 tolerances used by the checks.
"""
from __future__ import annotations

import warnings

import torch

from attnlab.models import transformers_major

VOCAB = 128
HIDDEN = 32


def tiny_config(kind: str, vocab_size: int = VOCAB, **over):
    import transformers as tf

    common = dict(vocab_size=vocab_size, max_position_embeddings=128, initializer_range=0.2)
    if kind == "llama":  # GQA: 4 query heads, 2 KV heads
        cfg = tf.LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, **common)
    elif kind == "qwen2":  # GQA, q/k/v biases
        cfg = tf.Qwen2Config(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, use_sliding_window=False, **common)
    elif kind == "gpt2":
        common["n_positions"] = common.pop("max_position_embeddings")
        cfg = tf.GPT2Config(n_embd=HIDDEN, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    elif kind == "bert":
        cfg = tf.BertConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0, **common)
    else:
        raise ValueError(kind)
    for k, v in over.items():
        setattr(cfg, k, v)
    return cfg


def skip_bert_before_5(kind: str = "bert") -> None:
    """Skip a test of a BERT model under transformers 4: BertModel calls the attention interface from 5 on
    (`test_bert_before_transformers_5_is_refused_in_one_line` holds 4's refusal)."""
    if kind == "bert" and transformers_major() < 5:
        import pytest

        pytest.skip("BertModel calls transformers' attention interface from transformers 5 on")


def tiny_model(kind: str, seed: int = 0, attn_implementation: str | None = None, legacy_bert: bool = False, **over):
    """A seeded tiny model in eval mode: *ForCausalLM for llama/qwen2/gpt2, BertModel for bert (the test skipped
    under transformers 4 unless legacy_bert)."""
    import transformers as tf

    if not legacy_bert:
        skip_bert_before_5(kind)

    cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "gpt2": tf.GPT2LMHeadModel,
           "bert": tf.BertModel}[kind]
    cfg = tiny_config(kind, **over)
    if attn_implementation is not None:
        cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = cls(cfg)
    return model.eval()


def outputs(model, input_ids, **kw) -> torch.Tensor:
    """Logits of an LM or last hidden states of an encoder, without grad."""
    with torch.no_grad():
        out = model(input_ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def rand_ids(b: int, t: int, seed: int = 0, low: int = 1, high: int = VOCAB) -> torch.Tensor:
    return torch.randint(low, high, (b, t), generator=torch.Generator().manual_seed(seed))


def pad_batch(seqs: list[torch.Tensor], side: str, pad_id: int = 0):
    """(input_ids, attention_mask, position_ids) of a padded batch; positions count real tokens only, so
    each row sees the same positions as the sequence alone (matters for absolute and rotary embeddings)."""
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), t, dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s)
        sl = slice(0, n) if side == "right" else slice(t - n, t)
        ids[i, sl], mask[i, sl] = s, 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids, mask, pos


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item()
