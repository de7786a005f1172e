"""Put methods into a model, per layer, reversibly; run the model's own attention on the same weights.

    attnlab.swap(model, "window", window=128)                      # every attention layer
    attnlab.swap(model, {"*": "performer", "0-3": "original"})     # a per-layer spec (adapters/spec.py)
    attnlab.swapped_spec(model)                                    # the active SwapSpec (plain data), or None
    with attnlab.original(model): ...                              # the model's own attention, methods kept
    attnlab.unswap(model)                                          # the full restore

Works on Hugging Face transformers models (through `adapters.hf`) and on any model holding
`torch.nn.MultiheadAttention` layers (through `adapters.mha`). Everything is checked before anything
changes: unknown methods or options, a method that cannot do causal attention in a causal layer, a selector
that matches no layer. Each swapped layer holds its own method instance (`module.attnlab_method`), so its
parameters are model parameters and its trained state survives `original(...)`.
"""
from __future__ import annotations

import contextlib
import dataclasses

from .. import registry
from ..types import AttnlabError, UnsupportedError
from . import hf, lora
from .spec import ORIGINAL, LayerPlan, SwapSpec, layer_seed

_STATE = "_attnlab_swap_state"


@dataclasses.dataclass
class SwapState:
    spec: SwapSpec
    plans: list[LayerPlan]
    kind: str  # "hf" | "mha"
    impl: str | None = None  # the HF attention implementation before the swap
    in_original: bool = False


def state(model) -> SwapState | None:
    return getattr(model, _STATE, None)


def attention_sites(model) -> list[tuple[str, object]]:
    """(name, module) of every attention layer the adapters can swap, in model order."""
    if hf.is_hf_model(model):
        return hf.attention_modules(model)
    from . import mha

    return mha.mha_modules(model)


def attention_modules(model):
    """The modules of `attention_sites`, for the swapped model as well (MHA layers are attnlab's then)."""
    return attention_sites(model)


def _check_plan(model, plan: LayerPlan, module) -> None:
    caps = registry.capabilities(plan.method)
    if getattr(module, "is_causal", False) and not caps.causal:
        raise UnsupportedError(
            f"method {plan.method!r} cannot do causal attention, and {type(model).__name__} layer {plan.name!r} is "
            f"causal (a decoder); choose a causal-capable method: "
            f"{', '.join(n for n in registry.list_methods() if registry.capabilities(n).causal)}"
        )
    if getattr(module, "sliding_window", None) and not caps.attn_mask:
        raise UnsupportedError(
            f"layer {plan.name!r} uses sliding-window attention, which needs a method that accepts an arbitrary "
            f"attn_mask; {plan.method!r} does not"
        )


def _hf_plans(model, spec: SwapSpec) -> tuple[list, list[LayerPlan]]:
    """(sites, plans) of a transformers model: every check of a swap that reads no weights (the layers found, the
    selectors, each layer's method against the layer: causal, sliding window, adapters)."""
    sites = hf.attention_modules(model)
    if not sites:
        raise AttnlabError(f"found no attention layers dispatching through transformers' attention interface in "
                           f"{type(model).__name__}{hf.interface_hint()}")
    plans = spec.plan([n for n, _ in sites])
    for plan, (_, mod) in zip(plans, sites):
        if plan.method != ORIGINAL:
            _check_plan(model, plan, mod)
            if plan.lora:
                lora.check_site(mod, plan.lora)
    return sites, plans


def _mha_plans(model, spec: SwapSpec) -> list[LayerPlan]:
    """The plans of a model of torch.nn.MultiheadAttention layers, with every check of a swap that reads no weights."""
    from . import mha

    sites = mha.mha_modules(model)
    if not sites:
        raise UnsupportedError(f"no torch.nn.MultiheadAttention (and no transformers attention layer) found in "
                               f"{type(model).__name__}")
    plans = spec.plan([n for n, _ in sites])
    if any(p.lora for p in plans):
        raise UnsupportedError("lora adapters need a transformers model's attention projections; "
                               "nn.MultiheadAttention's fused input projection has none to adapt")
    return plans


def check(model, spec, seq_len: int | None = None) -> list[LayerPlan]:
    """What `swap(model, spec)` would refuse, refused without swapping; the layers' plans otherwise. For the commands'
    checks before a load: `model` may be a skeleton on the meta device (`attnlab.models.skeleton`). With `seq_len`
    (a transformers model), also a method built for shorter inputs than the run feeds it (its `max_len`: one
    instance of each distinct method and options, at the layer's head shape, on the CPU)."""
    spec = SwapSpec.of(spec)
    if not hf.is_hf_model(model):
        return _mha_plans(model, spec)
    sites, plans = _hf_plans(model, spec)
    if seq_len is not None:
        seen = set()
        for plan, (_, mod) in zip(plans, sites):
            opts = {k: v for k, v in plan.options.items() if k != "seed"}
            key = (plan.method, repr(sorted(opts.items())))
            if plan.method == ORIGINAL or "layer" in opts or key in seen:
                continue  # a method built from per-layer data (global_sparse) meets its shapes at swap time
            seen.add(key)
            heads, kv_heads, head_dim = hf.head_shape(mod, model.config)
            built = registry.make(plan.method, head_dim=head_dim, num_heads=heads, num_kv_heads=kv_heads, **opts)
            if built.max_len is not None and seq_len > built.max_len:
                raise UnsupportedError(f"layer {plan.name!r}: {plan.method} with {opts} is built for at most "
                                       f"max_len={built.max_len} tokens; this run feeds {seq_len}")
    return plans


def swap(model, spec, **options):
    """Run the attention layers of `model` through the methods of `spec` (a method name with options, or a
    per-layer spec). Random methods get a per-layer seed from the spec's seed. Returns the model."""
    if state(model) is not None:
        raise AttnlabError(f"model already has {state(model).spec.describe()!r} swapped in; call attnlab.unswap(model) first")
    spec = SwapSpec.of(spec, **options)
    if not hf.is_hf_model(model):
        from . import mha

        plans = _mha_plans(model, spec)
        mha.swap_modules(model, plans)
        setattr(model, _STATE, SwapState(spec, plans, "mha"))
        return model
    sites, plans = _hf_plans(model, spec)
    impl = model.config._attn_implementation
    built = []
    for plan, (_, mod) in zip(plans, sites):
        if plan.method == ORIGINAL:
            continue
        heads, kv_heads, head_dim = hf.head_shape(mod, model.config)
        built.append((plan, mod, registry.make(plan.method, head_dim=head_dim, num_heads=heads,
                                               num_kv_heads=kv_heads, **plan.options)))
    if len(built) < len(plans):
        hf.check_original_impl(impl)  # layers left original run through the model's own attention function
    hf.register()
    ref = next(model.parameters())
    st = SwapState(spec, plans, "hf", impl)
    for _, mod, m in built:
        mod.attnlab_method = m.to(device=ref.device)
    _attach_adapters(st, dict(sites))
    for plan, (_, mod) in zip(plans, sites):
        mod.attnlab_original_impl = impl
    setattr(model, _STATE, st)
    hf.set_implementation(model, hf.NAME)
    return model


def add_lora(model, rank: int):
    """Give every swapped layer of `model` (a transformers model, e.g. after `attnlab.load`) low-rank adapters of
    `rank` on its projections; the active spec becomes `spec.with_lora(rank)` (what `attnlab.save` then writes)."""
    st = state(model)
    if st is None or st.kind != "hf":
        raise UnsupportedError("add_lora: needs a transformers model with a method swapped in")
    if any(p.lora for p in st.plans):
        raise AttnlabError("add_lora: the swapped layers already have adapters")
    spec = st.spec.with_lora(rank)
    sites = dict(attention_sites(model))
    plans = spec.plan(list(sites))  # validates the rank too
    for plan in plans:
        if plan.lora:
            lora.check_site(sites[plan.name], rank)
    st.spec, st.plans = spec, plans
    _attach_adapters(st, sites)
    return model


def _attach_adapters(st: SwapState, sites: dict) -> None:
    """Hook each planned layer's adapters in (active while the swapped attention runs, not inside original), A drawn
    from the spec's per-layer seed."""
    for plan in st.plans:
        if plan.lora:
            mod = sites[plan.name]
            lora.attach(mod, mod.attnlab_method, plan.lora, st, seed=layer_seed(st.spec.seed, plan.index))


def swapped_spec(model) -> SwapSpec | None:
    """The SwapSpec active on `model` (JSON: `.to_dict()`), or None when nothing is swapped in."""
    st = state(model)
    return None if st is None else st.spec


def swapped_layers(model) -> list[LayerPlan]:
    """Per layer: index, module name, method ("original" = its own attention) and the options it was built with."""
    st = state(model)
    if st is None:
        raise AttnlabError("model has no attnlab method swapped in")
    return list(st.plans)


def method_modules(model) -> list[tuple[LayerPlan, object]]:
    """(plan, method module) of every swapped layer (original layers left out)."""
    st = state(model)
    if st is None:
        raise AttnlabError("model has no attnlab method swapped in")
    sites = dict(attention_sites(model)) if st.kind == "hf" else None
    out = []
    if st.kind == "mha":
        from . import mha

        for plan, mod in zip(st.plans, mha.swapped_modules(model, st.plans)):
            if mod is not None:
                out.append((plan, mod.attnlab_method))
        return out
    for plan in st.plans:
        if plan.method != ORIGINAL:
            out.append((plan, sites[plan.name].attnlab_method))
    return out


def unswap(model):
    """Restore the model exactly as it was before `swap` (the method modules are dropped)."""
    st = state(model)
    if st is None:
        from . import mha

        if mha.restore_mha(model):
            return model
        raise AttnlabError("model has no attnlab method swapped in")
    if st.in_original:
        raise AttnlabError("attnlab.unswap inside attnlab.original(...): leave the original() block first")
    if st.kind == "mha":
        from . import mha

        mha.restore_mha(model)  # also drops the swap state
        return model
    else:
        for _, mod in hf.attention_modules(model):
            lora.detach(mod)
            for attr in ("attnlab_method", "attnlab_capture", "attnlab_probs", "attnlab_original_impl"):
                if hasattr(mod, attr):
                    delattr(mod, attr)
        hf.set_implementation(model, st.impl)
    delattr(model, _STATE)
    return model


@contextlib.contextmanager
def swapped(model, spec, **options):
    """swap ... unswap around a block. `spec` may also be `attnlab.Saved(DIR)`: the trained attention in DIR."""
    from .state import Saved, load

    if isinstance(spec, Saved):
        load(model, spec.path)
    else:
        swap(model, spec, **options)
    try:
        yield model
    finally:
        unswap(model)


@contextlib.contextmanager
def original(model):
    """Run the model's own attention inside the block while the swapped methods stay in place with their state:
    the teacher of distillation on the same weights, with no second copy of the model."""
    st = state(model)
    if st is None:
        raise AttnlabError("attnlab.original(model): nothing is swapped in (the model already runs its own attention)")
    if st.in_original:
        yield model
        return
    st.in_original = True
    try:
        if st.kind == "hf":
            hf.set_implementation(model, st.impl)
        else:
            from . import mha

            mha.put_back_originals(model)
        yield model
    finally:
        if st.kind == "hf":
            hf.set_implementation(model, hf.NAME)
        else:
            from . import mha

            mha.put_back_swapped(model)
        st.in_original = False
