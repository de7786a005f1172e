"""torch.nn.functional.scaled_dot_product_attention: flash / memory-efficient / math / cuDNN chosen by torch
(`backend="auto"`) or by name. Its extras (lse, column sums) come from `ops.reference`'s blockwise pass: the
same maths as SDPA's math kernel, a block of query rows at a time, never the Tq x Tk matrix."""
from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F

from .. import masks
from ..ops.reference import blockwise_attention
from ..registry import register
from ..types import AttnOutput, Capabilities, opt
from .base import AttentionMethod, repeat_kv

_BACKENDS = ("auto", "flash", "efficient", "math", "cudnn")


@register("sdpa")
class SDPA(AttentionMethod):
    """PyTorch's fused attention. Same numbers as `dense`, never builds the matrix (flash/efficient paths)."""
    complexity = ("O(n² d)", "O(n)", "fused flash / memory-efficient kernels")

    capabilities = Capabilities(causal=True, padding=True, attn_mask=True, probs=False, extras=("lse", "col_sums"))
    native_gqa = True

    @dataclasses.dataclass
    class Options:
        backend: str = opt("auto", "auto | flash | efficient | math | cudnn (torch.nn.attention.sdpa_kernel)",
                           choices=_BACKENDS)

    @classmethod
    def exact_limit(cls, tq, tk):
        return {}

    def _unsupported_reasons(self, *, causal, tq, tk, dtype, device, need_lse=False, need_col_sums=False,
                             need_probs=False) -> list[str]:
        if self.opts.backend in ("efficient", "cudnn") and device is not None and torch.device(device).type != "cuda":
            return [f"backend={self.opts.backend!r} runs on CUDA only (here: auto, flash or math)"]
        return []

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs, need_lse=False,
                need_col_sums=False):
        tq, tk = q.shape[-2], k.shape[-2]
        self.kernel = f"sdpa[{self.opts.backend}]"
        with _backend(self.opts.backend):
            if key_padding_mask is None and attn_mask is None and not (causal and tq != tk):
                gqa = q.shape[1] != k.shape[1]
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
            else:
                # SDPA's is_causal aligns top-left; ours aligns bottom-right, so build the mask when Tq != Tk.
                allowed, bias = masks.combine(
                    tq, tk, causal=causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask, device=q.device
                )
                # enable_gqa together with an explicit mask is not served by every backend: expand instead.
                groups = q.shape[1] // k.shape[1]
                out = sdpa_allowed(q, repeat_kv(k, groups), repeat_kv(v, groups), allowed, bias=bias, scale=scale)
        if not (need_lse or need_col_sums):
            return out, None
        groups = q.shape[1] // k.shape[1]
        _, lse, cols = blockwise_attention(
            q, repeat_kv(k, groups), repeat_kv(v, groups), scale=scale, causal=causal,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask, need_out=False, need_lse=need_lse,
            need_col_sums=need_col_sums,
        )
        return AttnOutput(out, None, lse=lse, col_sums=cols)


def sdpa_allowed(q, k, v, allowed: torch.Tensor | None, *, scale: float, bias: torch.Tensor | None = None) -> torch.Tensor:
    """SDPA under a Bool `allowed` mask (broadcastable to [B, H, Tq, Tk]; None = every key) and an optional
    float `bias` added to the scores, in the inputs' dtype, with rows that have no allowed key set to zeros,
    never NaN. Used by the `sdpa` method and linformer: no mask lets torch pick flash; a mask picks
    the memory-efficient kernel."""
    if allowed is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=scale)
    has = allowed.any(-1, keepdim=True)
    # an empty row attends to everything inside the kernel (finite, and no NaN in its backward: measured on
    # CUDA's memory-efficient kernel), then is zeroed, which also stops its gradient
    mask = allowed | ~has
    if bias is not None:
        mask = bias.to(q.dtype).masked_fill(~has, 0.0).masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.masked_fill(~has, 0.0)


def _backend(name: str):
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }
    return sdpa_kernel([table[name]])
