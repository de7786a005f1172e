"""`swap(model, method, **options)`, `unswap(model)`, `swapped(...)`: reversible, per-layer method modules.

Works on Hugging Face transformers models (through `adapters.hf`) and on any model holding
`torch.nn.MultiheadAttention` layers (through `adapters.mha`). Swapping is checked before anything
changes: a method that cannot do causal attention is refused for a causal model, with the reason.
"""
from __future__ import annotations

import contextlib

from .. import registry
from ..types import AttnlabError, UnsupportedError
from . import hf

_STATE = "_attnlab_swap_state"


def attention_modules(model):
    if hf.is_hf_model(model):
        return hf.attention_modules(model)
    from . import mha

    return mha.mha_modules(model)


def swap(model, method: str, **options):
    """Run every attention layer of `model` through `method` (per-layer instances built by `attnlab.make`)."""
    if getattr(model, _STATE, None) is not None:
        raise AttnlabError(f"model already has {getattr(model, _STATE)['method']!r} swapped in; call attnlab.unswap(model) first")
    if not hf.is_hf_model(model):
        from . import mha

        return mha.replace_mha(model, method, **options)
    mods = hf.attention_modules(model)
    if not mods:
        raise AttnlabError(f"found no attention layers dispatching through transformers' attention interface in {type(model).__name__}")
    caps = registry.capabilities(method)
    built = []
    for name, mod in mods:
        if getattr(mod, "is_causal", False) and not caps.causal:
            raise UnsupportedError(
                f"method {method!r} cannot do causal attention, and {type(model).__name__} layer {name!r} is causal "
                f"(a decoder); choose a causal-capable method: "
                f"{', '.join(n for n in registry.list_methods() if registry.capabilities(n).causal)}"
            )
        if getattr(mod, "sliding_window", None) and not caps.attn_mask:
            raise UnsupportedError(
                f"layer {name!r} uses sliding-window attention, which needs a method that accepts an arbitrary "
                f"attn_mask; {method!r} does not"
            )
        heads, kv_heads, head_dim = hf.head_shape(mod, model.config)
        built.append((mod, registry.make(method, head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads, **options)))
    hf.register()
    ref = next(model.parameters())
    for mod, m in built:
        mod.attnlab_method = m.to(device=ref.device)
    setattr(model, _STATE, {"method": method, "options": options, "impl": model.config._attn_implementation})
    hf.set_implementation(model, hf.NAME)
    return model


def unswap(model):
    """Restore the model exactly as it was before `swap`."""
    state = getattr(model, _STATE, None)
    if state is None:
        from . import mha

        if mha.restore_mha(model):
            return model
        raise AttnlabError("model has no attnlab method swapped in")
    for _, mod in hf.attention_modules(model):
        if hasattr(mod, "attnlab_method"):
            del mod.attnlab_method
        for attr in ("attnlab_capture", "attnlab_probs"):
            if hasattr(mod, attr):
                delattr(mod, attr)
    hf.set_implementation(model, state["impl"])
    delattr(model, _STATE)
    return model


@contextlib.contextmanager
def swapped(model, method: str, **options):
    swap(model, method, **options)
    try:
        yield model
    finally:
        unswap(model)
