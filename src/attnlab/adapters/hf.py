"""Hugging Face transformers adapter: one attention function and one mask function, registered under "attnlab".

transformers calls `attention_interface(module, q, k, v, attention_mask, dropout=, scaling=, **kw)` with
q [B, H, Tq, D], k/v [B, Hkv, Tk, D] and expects (out [B, Tq, H, D], weights | None). The method for a layer
lives on the module (`module.attnlab_method`) so its parameters are part of the model.

The mask trap: an attention name registered without a mask function gets *no* mask at all (transformers
skips mask creation for unknown names), so a decoder would silently attend to the future. We register
`attnlab_mask` as well. It returns the cheapest faithful description of the mask:
  - None when the mask is exactly "causal (or full) and no padding": the layer's `is_causal` says which;
  - a Bool[B, Tk] key padding mask when it is causal/full + padding, with queries aligned bottom-right
    (the last query is the last key: prefill and KV-cache decoding alike);
  - otherwise the full Bool[B, 1, Tq, Tk] mask (sliding windows, packed sequences, static caches, ...),
    which only methods that accept an arbitrary attn_mask can serve; the others raise a clear error.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import warnings

import torch

from .. import masks
from ..types import UnsupportedError

NAME = "attnlab"


def _plain_mask_functions():
    from transformers import masking_utils as mu

    return mu.causal_mask_function, getattr(mu, "bidirectional_mask_function", None)


def interface_hint() -> str:
    """What to add to "no layer calls the attention interface" under transformers 4: several architectures (BERT,
    the packaged MiniLM's, among them) call it only from transformers 5 on."""
    from ..models import transformers_major, transformers_version

    if transformers_major() >= 5:
        return ""
    return f" (this is transformers {transformers_version()}; BERT among others calls the interface from transformers 5 on)"


def _one_sequence_a_row(mask_function, causal_fn):
    """transformers 4 looks for packed sequences on every call without a cache or an attention mask, and hands the
    mask builder "causal and same sequence" even where each row is one sequence; transformers 5 reads that on the
    host and hands the plain causal function. The same read here, on the packing table inside transformers 4's
    closures: causal_fn where every row is one sequence (one label a row, whatever the labels: a caller's
    and_mask_function of the same shape need not count from 0), mask_function as it came otherwise (and where the
    read cannot be made: a trace, a capture, or closures of another shape)."""
    if getattr(mask_function, "__qualname__", "") != "and_masks.<locals>.and_mask" or not mask_function.__closure__:
        return mask_function
    parts = mask_function.__closure__[0].cell_contents
    if not (isinstance(parts, tuple) and len(parts) == 2 and parts[0] is causal_fn
            and getattr(parts[1], "__qualname__", "") == "packed_sequence_mask_function.<locals>.inner_mask"
            and parts[1].__closure__):
        return mask_function
    packed = parts[1].__closure__[0].cell_contents
    if not torch.is_tensor(packed) or packed.dim() != 2 or torch.compiler.is_compiling() or _capturing():
        return mask_function
    return causal_fn if bool((packed == packed[:, :1]).all()) else mask_function


def _first_position(cache_position: torch.Tensor, kv_length: int, kv_offset: int, kwargs: dict) -> int | None:
    """transformers 4's queries start at cache_position[0]: read where that costs no device sync (CPU); on a device,
    known where there are as many keys as queries from 0 (they are the queries' own: no cache, as in training and
    scoring, where transformers 4 also turns `allow_is_causal_skip` off for its packed-sequence check) or where
    transformers itself would take the plain causal mask (`allow_is_causal_skip`: a cache that grows with the keys,
    so the last query is the last key); None otherwise (then the full mask is built)."""
    if cache_position.device.type == "cpu" and not torch.compiler.is_compiling():
        return int(cache_position[0])
    # (a sliding-window cache layer's kv_offset is a tensor: not read)
    if isinstance(kv_offset, int) and kv_offset == 0 and (kwargs.get("allow_is_causal_skip", False)
                                                          or kv_length == cache_position.shape[0]):
        return kv_length - cache_position.shape[0]
    return None


def attnlab_mask(
    batch_size: int,
    q_length: int | None = None,
    kv_length: int | None = None,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    cache_position: torch.Tensor | None = None,
    **kwargs,
):
    """transformers 5 describes the queries by q_length and q_offset, transformers 4 by cache_position (their
    positions, a tensor): both are taken, and handed on to `sdpa_mask` as they came."""
    from transformers import masking_utils as mu

    where = dict(q_length=q_length, q_offset=q_offset)
    if q_length is None:  # transformers 4
        where = dict(cache_position=cache_position)
        q_length, q_offset = cache_position.shape[0], _first_position(cache_position, kv_length, kv_offset, kwargs)
    causal_fn, bidir_fn = _plain_mask_functions()
    mask_function = causal_fn if mask_function is None else _one_sequence_a_row(mask_function, causal_fn)
    plain = mask_function is causal_fn or (bidir_fn is not None and mask_function is bidir_fn)
    aligned = (
        isinstance(q_offset, int) and isinstance(kv_offset, int) and kv_offset == 0 and q_offset + q_length == kv_length
    ) or mask_function is bidir_fn
    if plain and aligned:
        if attention_mask is None:
            return None
        padding = attention_mask[:, :kv_length].bool()
        if padding.shape[-1] == kv_length:
            return None if bool(padding.all()) else padding
    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("allow_is_bidirectional_skip", None)
    return mu.sdpa_mask(
        batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
        attention_mask=attention_mask, allow_is_causal_skip=False, **where, **kwargs,
    )


_warned_dropout = False


ORIGINAL_IMPLS = ("sdpa", "eager")


def check_original_impl(impl: str) -> None:
    """A spec that leaves layers original runs them through the model's own attention function under attnlab's
    mask; that translation exists for these implementations."""
    if impl not in ORIGINAL_IMPLS:
        raise UnsupportedError(f"a per-layer spec that keeps some layers original needs the model loaded with "
                               f"attn_implementation in {ORIGINAL_IMPLS}, got {impl!r}")


def _original_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs):
    """A layer the spec leaves original: the model's own attention function, with attnlab's mask (None, a
    Bool[B, Tk] key padding mask or a 4D mask) turned back into what that function expects."""
    impl = module.attnlab_original_impl
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    tq, tk = query.shape[-2], key.shape[-2]
    mask = attention_mask
    if mask is not None and mask.dim() == 2:  # key padding (+ causal): the 4D bool mask sdpa_mask would build
        allowed = mask.bool()[:, None, None, :]
        mask = allowed & masks.causal_allowed(tq, tk, query.device)[None, None] if causal else allowed.expand(-1, 1, tq, tk)
    if impl == "eager":
        if mask is None and causal:  # eager relies on the mask for causality
            mask = masks.causal_allowed(tq, tk, query.device)[None, None]
        if mask is not None and mask.dtype == torch.bool:
            mask = torch.where(mask, torch.zeros((), dtype=query.dtype, device=query.device),
                               torch.tensor(torch.finfo(query.dtype).min, dtype=query.dtype, device=query.device))
        fn = sys.modules[type(module).__module__].eager_attention_forward
        return fn(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl](module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                         is_causal=is_causal, **kwargs)


def attnlab_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, is_causal=None, **kwargs):
    method = getattr(module, "attnlab_method", None)
    if method is None and getattr(module, "attnlab_original_impl", None) is not None:
        return _original_attention(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)
    if method is None:
        raise UnsupportedError(
            f"{type(module).__name__} runs attn_implementation='attnlab' but has no method attached; "
            "use attnlab.swap(model, ...) rather than setting the implementation by hand"
        )
    global _warned_dropout
    if dropout and not _warned_dropout:
        warnings.warn("attnlab methods do not apply attention dropout (the model asked for %.3g)" % dropout)
        _warned_dropout = True
    query, key, value = autocast_inputs(query, key, value)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    key_padding_mask = attn_mask = None
    if attention_mask is not None:
        if attention_mask.dim() == 2:
            key_padding_mask = attention_mask
        elif attention_mask.dim() == 4:
            attn_mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(query.dtype)
        else:
            raise UnsupportedError(f"attnlab: unexpected attention_mask of shape {tuple(attention_mask.shape)}")
    key_mask = getattr(module, "attnlab_key_mask", None)
    if key_mask is not None:  # per-head visible cache slots (an AdaKV-pressed KV cache, reduction/kv_press.py)
        attn_mask = _with_key_mask(attn_mask, key_padding_mask, key_mask, query.shape[1], key.shape[-2])
        key_padding_mask = None
    if getattr(module, "attnlab_calibrate", False) and hasattr(method, "calibrate"):
        method.calibrate(query, repeat_kv_for(method, key, query), causal=causal, key_padding_mask=key_padding_mask,
                         scale=scaling if scaling is not None else query.shape[-1] ** -0.5)
    if getattr(module, "attnlab_transfer", None) is not None:
        return _transfer_attention(module, method, query, key, value, attention_mask, dropout, scaling, is_causal,
                                   causal, key_padding_mask, attn_mask, **kwargs)
    capture = getattr(module, "attnlab_capture", False)
    need_probs = bool(kwargs.get("output_attentions", False)) or capture
    kw = dict(causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, scale=scaling,
              need_probs=need_probs)
    if torch.compiler.is_compiling():
        out, probs = _eager_call(query, key, value, method=method, **kw)
    else:
        out, probs = method(query, key, value, **kw)
    if capture:
        module.attnlab_probs = probs
    return out.transpose(1, 2).contiguous(), probs  # (B, Tq, H, D)


def autocast_inputs(query, key, value):
    """q, k, v in the autocast dtype where autocast is on, as autocast runs SDPA (the original's attention): under
    autocast the projections come out in it, but rotary embeddings in fp32 can bring q and k back to fp32 (Llama in
    transformers 5.24 on CPU), and a method then gets mixed dtypes."""
    dev = query.device.type
    if not torch.is_autocast_enabled(dev) or not query.is_floating_point():
        return query, key, value
    dt = torch.get_autocast_dtype(dev)
    return query.to(dt), key.to(dt), value.to(dt)


@torch.compiler.disable
def _eager_call(query, key, value, *, method, **kw):
    """The method outside a torch.compile'd model's graph (one graph break per layer): inductor failed to build
    attnlab's own Triton kernels (window, causal linear) as user kernels in torch 2.11 on the H200, and the
    methods choose their kernels themselves (flex is compiled on its own); the rest of the layer still compiles."""
    return method(query, key, value, **kw)


def _with_key_mask(attn_mask, key_padding_mask, key_mask, heads: int, tk: int):
    """attn_mask AND a per-KV-head key mask Bool[B, Hkv, K] (keys from K on, appended after the press: visible),
    as a Bool (or additive float) [B, H, Tq|1, Tk] mask."""
    b, hkv, k = key_mask.shape
    km = torch.nn.functional.pad(key_mask, (0, tk - k), value=True) if tk > k else key_mask[..., :tk]
    km = km.repeat_interleave(heads // hkv, dim=1)[:, :, None, :]  # [B, H, 1, Tk]
    if key_padding_mask is not None:
        km = km & key_padding_mask.bool()[:, None, None, :]
    if attn_mask is None:
        return km
    if attn_mask.dtype == torch.bool:
        return attn_mask & km
    return attn_mask.masked_fill(~km, float("-inf"))


def repeat_kv_for(method, key, query):
    """k expanded to the query heads (GQA) for a method's own bookkeeping outside its forward."""
    from ..methods.base import repeat_kv

    return repeat_kv(key, query.shape[1] // key.shape[1])


def _transfer_attention(module, method, query, key, value, attention_mask, dropout, scaling, is_causal, causal,
                        key_padding_mask, attn_mask, **kwargs):
    """Attention transfer (LoLCATs, Hedgehog): the layer's method runs on the original attention's inputs, the
    squared error to the original's output is recorded in `module.attnlab_transfer`, and the ORIGINAL output goes
    on, so every layer trains on the teacher's activations in one forward, with no backward through the model."""
    with torch.no_grad():
        teacher, _ = _original_attention(module, query.detach(), key.detach(), value.detach(), attention_mask,
                                         dropout, scaling, is_causal, **kwargs)  # (B, Tq, H, D)
    out = method(query.detach(), key.detach(), value.detach(), causal=causal, key_padding_mask=key_padding_mask,
                 attn_mask=attn_mask, scale=scaling).out.transpose(1, 2)  # (B, Tq, H, D)
    module.attnlab_transfer.append(torch.nn.functional.mse_loss(out.float(), teacher.float()))
    aux = getattr(method, "aux_loss", None)
    if aux is not None:
        module.attnlab_transfer.append(aux)
    return teacher.contiguous(), None


_registered = False


def register() -> None:
    """Register the attention and mask functions under "attnlab" (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attnlab_attention)
    AttentionMaskInterface.register(NAME, attnlab_mask)
    _registered = True


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


MASK_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask", "create_bidirectional_mask")


@contextlib.contextmanager
def mask_outside_capture(model):
    """For capturing a transformers model's step as a CUDA graph (whole-network capture, `torch.cuda.graph`).

    transformers decides the mask with host reads (packed-sequence detection, "is the padding all ones?") that it
    skips while a CUDA stream is capturing, and then materialises a 4D mask instead: a captured step would run SDPA
    with an explicit mask (not its causal flash kernel) and hand attnlab's methods an arbitrary mask. Inside this
    context each mask builder of the model's module remembers what it returned on the last call outside a
    capture (the warm-up, same inputs) and returns that while capturing, the way a generation loop with a static
    cache keeps its mask out of the graph. Capturing before any warm-up call is an error. Yields the decisions
    ({builder name: mask}): a mask that is a tensor must outlive the graph that captured its address. Not
    re-entrant across overlapping uses on one model class's module (each use restores what it found)."""
    mod = sys.modules[type(getattr(model, "base_model", model)).__module__]
    saved = {name: getattr(mod, name) for name in MASK_BUILDERS if hasattr(mod, name)}
    if not saved:
        raise UnsupportedError(f"{mod.__name__} builds no transformers mask (none of {', '.join(MASK_BUILDERS)})")

    def decided(name, make):
        def builder(*args, **kwargs):
            if _capturing():
                if name not in last:
                    raise RuntimeError(f"{name} reached inside a CUDA graph capture before any warm-up call: "
                                       "run the step once outside the capture first")
                return last[name]
            last[name] = make(*args, **kwargs)
            return last[name]
        return builder

    last = {}
    for name, make in saved.items():
        setattr(mod, name, decided(name, make))
    try:
        yield last  # the decided masks: a captured graph reads them, so its owner keeps this alive beside it
    finally:
        for name, make in saved.items():
            setattr(mod, name, make)


def is_hf_model(model) -> bool:
    return hasattr(model, "config") and hasattr(model.config, "_attn_implementation")


@functools.lru_cache(maxsize=None)
def _dispatches_attention(cls: type) -> bool:
    """Whether a module class's forward goes through transformers' attention interface (read once per class)."""
    try:
        src = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in src or "attention_interface" in src


def attention_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """Modules whose forward dispatches through transformers' attention interface."""
    return [(name, mod) for name, mod in model.named_modules() if _dispatches_attention(type(mod))]


def head_shape(module, config) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of one attention module."""
    cfg = getattr(module, "config", None) or config
    cfg = getattr(cfg, "get_text_config", lambda: cfg)()
    heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None) or cfg.num_attention_heads
    head_dim = (
        getattr(module, "head_dim", None)
        or getattr(module, "attention_head_size", None)
        or getattr(cfg, "head_dim", None)
        or cfg.hidden_size // cfg.num_attention_heads
    )
    groups = getattr(module, "num_key_value_groups", 1)
    kv = getattr(cfg, "num_key_value_heads", None) or heads // groups
    return int(heads), int(kv), int(head_dim)


def set_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # transformers < 4.56-ish: set it on every config the model holds
        for mod in model.modules():
            cfg = getattr(mod, "config", None)
            if cfg is not None and hasattr(cfg, "_attn_implementation"):
                cfg._attn_implementation = name
