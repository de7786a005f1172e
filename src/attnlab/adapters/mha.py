"""`attnlab.nn.MultiheadAttention`: a drop-in for `torch.nn.MultiheadAttention` running any attnlab method.

Same constructor, forward signature and state_dict keys as torch's module (it *is* a subclass, so
`load_state_dict(torch_mha.state_dict())` works unchanged); the attention itself runs through
`attnlab.make(method, ...)`. torch's conventions are translated at the boundary:
- torch's key_padding_mask is True where the key is *padding*; attnlab's is True where it is real;
- torch's bool attn_mask is True where attention is *not allowed*; attnlab's (SDPA's) is True where allowed;
- `is_causal=True` becomes the method's causal flag (so linear methods use prefix sums, not a mask).
Attention dropout is not applied (a warning says so once, in training mode).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..types import ShapeError, UnsupportedError


def _no_fastpath(module, args):
    """A forward pre-hook: torch's TransformerEncoderLayer skips its fused fast path (which would read
    the projection weights and bypass the method) whenever a hook is attached."""
    return None


class MultiheadAttention(nn.MultiheadAttention):
    """torch.nn.MultiheadAttention's constructor, forward and state_dict, with the attention run by an attnlab method:
    `method=` (default "dense") and its options as keywords, e.g. `MultiheadAttention(256, 8, batch_first=True,
    method="performer", num_features=128)`. torch's masks keep torch's meaning (True = padding / not allowed);
    `is_causal=True` is the method's causal flag; a row with no visible key gives zeros, not NaN; attention dropout
    is not applied (one warning in training mode); add_bias_kv / add_zero_attn are refused. A method's own buffers
    (drawn features) are extra state_dict keys: load torch's weights into this module, not the reverse."""

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None, *, method: str = "dense", **options):
        if add_bias_kv or add_zero_attn:
            raise UnsupportedError("attnlab.nn.MultiheadAttention does not support add_bias_kv / add_zero_attn")
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, kdim=kdim, vdim=vdim,
                         batch_first=batch_first, device=device, dtype=dtype)
        self.method_name = method
        self.attnlab_method = registry.make(method, head_dim=self.head_dim, num_heads=num_heads, **options)
        if device is not None or dtype is not None:
            self.attnlab_method.to(device=device, dtype=dtype)
        self.register_forward_pre_hook(_no_fastpath)
        self._warned = False

    def extra_repr(self) -> str:
        return f"method={self.method_name!r}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # torch's own state_dict has no keys for the method's parameters: keep ours where they are missing.
        for key, val in self.attnlab_method.state_dict(prefix=prefix + "attnlab_method.").items():
            state_dict.setdefault(key, val)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = query.dim() == 3
        if not batched:  # (T, E) -> (1, T, E): the internal layout is batch-first
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:  # internal layout is batch-first
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        b, tq, e = query.shape
        tk = key.shape[1]
        if e != self.embed_dim:
            raise ShapeError(f"MultiheadAttention: query embed dim {e} != embed_dim {self.embed_dim}")
        if need_weights and not self.attnlab_method.capabilities.probs:
            raise UnsupportedError(
                f"method {self.method_name!r} cannot return attention weights; call with need_weights=False"
            )
        if self.training and self.dropout > 0 and not self._warned:
            warnings.warn("attnlab.nn.MultiheadAttention does not apply attention dropout")
            self._warned = True

        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        h, d = self.num_heads, self.head_dim
        q = F.linear(query, w_q, b_q).view(b, tq, h, d).transpose(1, 2)  # (B, H, Tq, D)
        k = F.linear(key, w_k, b_k).view(b, tk, h, d).transpose(1, 2)  # (B, H, Tk, D)
        v = F.linear(value, w_v, b_v).view(b, tk, h, d).transpose(1, 2)

        kpm = key_bias = None
        if key_padding_mask is not None:  # torch: True/-inf = padding  ->  attnlab: True = real key
            if key_padding_mask.dtype == torch.bool:
                kpm = ~key_padding_mask
            else:  # torch ADDS a float key_padding_mask to the scores: -inf is padding, finite values a bias
                kpm = key_padding_mask > float("-inf")
                finite = key_padding_mask.masked_fill(~kpm, 0.0)
                if bool((finite != 0).any()):
                    key_bias = finite.to(q.dtype)[:, None, None, :]  # (B, 1, 1, Tk), additive
        mask = None
        if attn_mask is not None and not is_causal:
            if attn_mask.dim() == 3:  # (B * H, Tq, Tk) -> (B, H, Tq, Tk)
                attn_mask = attn_mask.view(b, h, tq, tk)
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(q.dtype)
        if key_bias is not None:  # never drop the bias: it travels as a float attn_mask (methods that take one)
            if mask is not None and mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            mask = key_bias if mask is None else mask + key_bias
        out, probs = self.attnlab_method(
            q, k, v, causal=bool(is_causal), key_padding_mask=kpm, attn_mask=mask, need_probs=need_weights
        )
        out = self.out_proj(out.transpose(1, 2).reshape(b, tq, e))  # (B, Tq, E)
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = probs.to(out.dtype)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights


def mha_modules(model):
    """torch.nn.MultiheadAttention layers of `model` that are not attnlab's own, in model order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.MultiheadAttention) and not isinstance(m, MultiheadAttention)]


def _share_weights(new: "MultiheadAttention", old: nn.MultiheadAttention) -> None:
    """Make `new` use `old`'s parameters and output projection (the same tensors, not copies): the model's own
    attention (`attnlab.original`) and the swapped one then always see the same weights."""
    for name, param in old._parameters.items():
        new._parameters[name] = param
    new.out_proj = old.out_proj


def swap_modules(model: nn.Module, plans) -> list:
    """Replace the MultiheadAttention layers the plans assign a method to by attnlab's, sharing their weights.
    Everything is built before anything is replaced (a bad option leaves the model untouched)."""
    from .spec import ORIGINAL

    sites = mha_modules(model)
    news = []
    for plan, (name, old) in zip(plans, sites):
        if plan.method == ORIGINAL:
            continue
        p = old.in_proj_weight if old.in_proj_weight is not None else old.q_proj_weight
        new = MultiheadAttention(
            old.embed_dim, old.num_heads, dropout=old.dropout, bias=old.in_proj_bias is not None, kdim=old.kdim,
            vdim=old.vdim, batch_first=old.batch_first, device=p.device, dtype=p.dtype, method=plan.method,
            **plan.options,
        )
        _share_weights(new, old)
        new.train(old.training)
        news.append((name, old, new))
    for name, old, new in news:
        _set(model, name, new)
        new._attnlab_original = [old]  # a list, so torch does not register it as a submodule
    # nn.TransformerEncoder's nested-tensor fast path would also bypass the method: turn it off (restored later)
    for mod in model.modules():
        if isinstance(mod, nn.TransformerEncoder) and getattr(mod, "use_nested_tensor", False):
            mod.use_nested_tensor = False
            mod._attnlab_nested = True
    return news


def _set(model, name, module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def swapped_modules(model, plans) -> list:
    """attnlab's MultiheadAttention per plan (None for layers left original), in plan order."""
    from .spec import ORIGINAL

    found = {}
    for n, m in model.named_modules():
        if isinstance(m, MultiheadAttention):
            found[n] = m
        elif hasattr(m, "_attnlab_swapped"):  # inside attnlab.original: the method module is parked on the torch one
            found[n] = m._attnlab_swapped[0]
    return [None if p.method == ORIGINAL else found.get(p.name) for p in plans]


def put_back_originals(model) -> None:
    """Inside `attnlab.original`: the torch modules back in place (the method modules are parked on them)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MultiheadAttention) and hasattr(mod, "_attnlab_original"):
            old = mod._attnlab_original[0]
            old._attnlab_swapped = [mod]
            _set(model, name, old)
    for mod in model.modules():
        if getattr(mod, "_attnlab_nested", False):
            mod.use_nested_tensor = True


def put_back_swapped(model) -> None:
    for name, mod in list(model.named_modules()):
        if hasattr(mod, "_attnlab_swapped"):
            new = mod._attnlab_swapped[0]
            del mod._attnlab_swapped
            _set(model, name, new)
    for mod in model.modules():
        if getattr(mod, "_attnlab_nested", False):
            mod.use_nested_tensor = False


def replace_mha(model: nn.Module, method: str, **options) -> nn.Module:
    """Swap every torch.nn.MultiheadAttention in `model` for attnlab's, keeping (sharing) the weights.
    The same as `attnlab.swap(model, method, **options)` on a model without transformers layers."""
    from .swap import swap

    if not mha_modules(model):
        raise UnsupportedError(f"no torch.nn.MultiheadAttention found in {type(model).__name__}")
    return swap(model, method, **options)


def restore_mha(model: nn.Module) -> bool:
    """Undo the MHA swap; returns whether anything was restored."""
    done = False
    for name, mod in list(model.named_modules()):
        if isinstance(mod, MultiheadAttention) and hasattr(mod, "_attnlab_original"):
            _set(model, name, mod._attnlab_original[0])
            done = True
    for mod in model.modules():
        if getattr(mod, "_attnlab_nested", False):
            mod.use_nested_tensor = True
            del mod._attnlab_nested
    if hasattr(model, "_attnlab_swap_state"):
        del model._attnlab_swap_state
    return done
