"""The shared shape of kernelised (linear) attention methods: a feature map (feature_maps/) for queries and
keys, then `ops.linear`'s core. linear, performer and rfa (and the learned maps of distillation) are this
class with their own options and feature maps.

Kernels (`backend`): "triton" runs the causal form through `ops.linear_triton` (CUDA; the CPU tests run it
under Triton's interpreter) with compiled feature maps, or with an elementwise map (`FeatureMap.kernel_map`: elu+1,
relu) applied inside the forward's kernels, and with gradients one map launch in the backward ("triton+map");
"compiled" the chunked PyTorch core with feature maps
through torch.compile; "eager" everything in plain PyTorch; "auto" is triton where it can serve the call on
CUDA, compiled on the rest of CUDA, eager on CPU. All compute the same function. A map may run the causal Triton
path as one node of its own (`FeatureMap.causal_triton`: FAVOR+, `ops.performer_triton`, "triton+favor"). `self.kernel`
names the one that ran ("triton", "triton+map", "triton+favor", "chunked", "one-pass" or "quadratic", "+compiled" when
the feature maps were).
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..ops.fused import compile_unavailable_reason
from ..ops.limits import rows_fit, span_reasons
from ..ops.linear import linear_attention, linear_attention_quadratic, linear_col_sums, triton_unsupported_reasons
from ..types import AttnOutput, opt, records_grad
from .base import AttentionMethod, repeat_kv

BACKENDS = ("auto", "triton", "compiled", "eager")


def _map_with_grad() -> bool:
    from ..ops import linear_triton

    return linear_triton.MAP_WITH_GRAD


class KernelAttention(AttentionMethod):
    """Subclasses set `self.feature_map` (one map for queries and keys) or `self.fm_q` and `self.fm_k`.

    GQA (fewer kv heads than query heads): a key map with no per-head parameters (`FeatureMap.head_shared`) maps
    each kv head's keys once and the group's query heads share the features (a third of SmolLM2's key-map work);
    a per-head map gets the keys expanded first. The causal Triton kernels' forward then reads the kv heads'
    features and values as they are (one state per kv head, no expanded copies; their backward expands them); the
    PyTorch forms get them expanded."""
    native_gqa = True

    def maps(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(query map, key map)."""
        if "feature_map" in self._modules:
            return self.feature_map, self.feature_map
        return self.fm_q, self.fm_k

    def feature_dim(self) -> int:
        return self.maps()[1].out_dim(self.head_dim)

    def flops(self, tq, tk, causal, *, grad=False):
        """Feature maps (their projections) + the linear-attention matmuls. Non-causal: K^T V and Q S, plus the
        normaliser. Causal (chunks of C = 64, the Triton kernel's): the state pass and the inter-chunk products
        as non-causal, plus the masked intra-chunk quadratic form (half of C per row, numerator and normaliser).
        Causal inputs the CUDA kernels run in one quadratic pass (T <= `linear_triton.parallel_max_t(F, grad)`: a
        shorter limit when autograd records): that form's work alone, every visible pair's phi(q).phi(k), its v and
        its normaliser term (the CPU's torch path runs the chunked form there: this is the count of the GPU's
        kernels)."""
        from ..ops.linear_triton import parallel_max_t
        from .base import visible_pairs

        f, d = self.feature_dim(), self.head_dim
        fq, fk = self.maps()
        maps = tq * fq.projection_flops(d) + tk * fk.projection_flops(d)
        if causal and tq == tk and tk <= parallel_max_t(f, grad) and self.opts.backend in ("auto", "triton"):
            return maps + 2.0 * visible_pairs(tq, tk, True) * (f + d + 1)
        core = 2.0 * tk * f * d + 2.0 * tq * f * d + 2.0 * tq * f
        if causal:
            c = 64
            core += tq * c * (f + d + 1)
        return maps + core

    def _triton_reasons(self, device, causal, tq, tk, dtype) -> list[str]:
        f = self.feature_dim()
        why = triton_unsupported_reasons(device, causal=causal, tq=tq, tk=tk, head_dim=self.head_dim,
                                         feature_dim=f, dtype=dtype)
        return why + span_reasons(tq, tk, heads=self.num_heads, head_dim=self.head_dim, feature_dim=f, fallback="compiled")

    def _unsupported_reasons(self, *, causal, tq, tk, dtype, device, need_probs=False, **extras):
        b = self.opts.backend
        if need_probs:  # the implied-matrix form is plain PyTorch whatever the backend
            return []
        if b == "triton":
            return [f"backend='triton': {r}" for r in self._triton_reasons(device, causal, tq, tk, dtype)]
        if b == "compiled" and device is not None and compile_unavailable_reason(device):
            return [f"backend='compiled': {compile_unavailable_reason(device)}"]
        return []

    def _choose(self, q, causal, tq, tk) -> tuple[str, bool]:
        """(core kernel "triton" | "torch", compile the feature maps), remembered per (device, causal, Tq, Tk, dtype,
        backend): the checks behind it read only those (7 us a call on the CPU here, every layer of every step)."""
        if torch.compiler.is_compiling():  # traced once: no cache to guard on
            return self._choose_uncached(q, causal, tq, tk)
        key = (q.device, causal, tq, tk, q.dtype, self.opts.backend)
        choices = self.__dict__.setdefault("_choices", {})  # a plain dict: not module state, never saved
        got = choices.get(key)
        if got is None:
            if len(choices) >= 64:
                choices.clear()
            got = choices[key] = self._choose_uncached(q, causal, tq, tk)
        return got

    def _choose_uncached(self, q, causal, tq, tk) -> tuple[str, bool]:
        b = self.opts.backend
        if b == "auto":
            if not q.is_cuda:
                return "torch", False
            compiled = compile_unavailable_reason(q.device) is None
            core = "triton" if causal and not self._triton_reasons(q.device, causal, tq, tk, q.dtype) else "torch"
            return core, compiled
        return ("triton" if b == "triton" else "torch"), b in ("triton", "compiled")

    def maybe_redraw(self) -> None:
        fq, fk = self.maps()  # no id()-keyed dict: torch.compile would guard on each layer's map object
        for fm in (fq,) if fq is fk else (fq, fk):
            if hasattr(fm, "maybe_redraw"):
                fm.maybe_redraw()

    def _attend(self, q, k, v, *, causal, key_padding_mask, attn_mask, scale, need_probs, need_lse=False,
                need_col_sums=False):
        self.maybe_redraw()
        tq, tk = q.shape[-2], k.shape[-2]
        core, compiled = self._choose(q, causal, tq, tk)
        if core == "triton" and self.opts.backend == "auto" and not rows_fit(q, k, v):
            core = "torch"  # a layout wider than the choice counted (a fused qkv's slices): past 32-bit row offsets
        fm_q, fm_k = self.maps()
        kmap = getattr(fm_k, "kernel_map", None)
        grad = records_grad(q, k, v)
        if (core == "triton" and kmap is not None and fm_q is fm_k and key_padding_mask is None and not need_probs
                and not need_col_sums and (not grad or _map_with_grad())):
            # an elementwise map: the forward's kernels map q and k as they load them (no feature tensors), the
            # backward maps them once in one launch (`linear_triton._map_features`) where mapping first costs four
            # (on the H200's host each launch costs tens of microseconds, and in a CUDA graph each a few of device time)
            from ..ops import linear_triton

            self.kernel = "triton+map"
            return linear_triton.causal_linear(q, k, v, feature_map=kmap), None
        fused = getattr(fm_k, "causal_triton", None)  # a map with its own one-node causal path (FAVOR+)
        if (core == "triton" and causal and fused is not None and fm_q is fm_k and key_padding_mask is None
                and not need_probs and not need_col_sums):
            out = fused(q, k, v, scale=scale, compiled=compiled)
            if out is not None:
                self.kernel = "triton+favor"
                return out, None
        groups = q.shape[1] // k.shape[1]
        if groups > 1 and not getattr(fm_k, "head_shared", False):  # a map that does not say: per head
            k = repeat_kv(k, groups)
        phi_q, _ = fm_q(q, scale=scale, is_query=True, compiled=compiled)  # (B, H, Tq, F)
        phi_k, k_log = fm_k(k, scale=scale, is_query=False, compiled=compiled)  # (B, H|Hkv, Tk, F), (B, H|Hkv, Tk)|None
        kv_groups = phi_q.shape[1] // phi_k.shape[1]  # > 1: mapped once per kv head, shared by the group's query heads
        if kv_groups > 1 and (need_probs or need_col_sums or core != "triton"):  # the Triton kernels read kv heads
            phi_k = repeat_kv(phi_k, kv_groups)
            k_log = None if k_log is None else repeat_kv(k_log[..., None], kv_groups)[..., 0]
        v = repeat_kv(v, phi_k.shape[1] // v.shape[1])  # as many heads as the key features
        kw = dict(causal=causal, key_padding_mask=key_padding_mask, key_log_scale=k_log)
        tag = "+compiled" if compiled else ""
        if need_probs:
            self.kernel = "quadratic" + tag
            out, probs = linear_attention_quadratic(phi_q, phi_k, v, **kw)
            cols = None
            if need_col_sums:
                rows = probs if key_padding_mask is None or tq != tk else probs * key_padding_mask[:, None, :, None]
                cols = rows.float().sum(-2)
            return AttnOutput(out, probs, col_sums=cols)
        self.kernel = ("triton" if core == "triton" else ("chunked" if causal else "one-pass")) + tag
        out = linear_attention(phi_q, phi_k, v, chunk_size=self.opts.chunk_size, kernel=core, **kw)
        if need_col_sums:
            return AttnOutput(out, None, col_sums=linear_col_sums(phi_q, phi_k, causal=causal,
                                                                  key_padding_mask=key_padding_mask))
        return out, None


@dataclasses.dataclass
class RandomFeatureOptions:
    num_features: int = opt(256, "random features m (the estimator's error falls like 1/sqrt(m))", low=1)
    redraw: bool = opt(False, "draw fresh features at every forward in training mode")
    seed: int = opt(0, "seed of the feature draw (same seed => same features; per layer from the swap seed)")
    chunk_size: int = opt(256, "tokens per chunk of the causal chunked form (same result for any value; 256: "
                               "fastest measured on an H100 at 64k)", low=1)
    backend: str = opt("auto", "auto | triton | compiled | eager (methods/_kernel.py)", choices=BACKENDS)
    learn_features: bool = opt(False, "train the projection (a parameter initialised by the draw; redraw-free): "
                                      "distillation")

    def __post_init__(self):
        from ..types import OptionError

        if self.learn_features is True and self.redraw is True:
            raise OptionError("learn_features and redraw exclude each other (a trained projection is never redrawn)")


class RandomFeatureAttention(KernelAttention):
    """A kernelised method whose feature map is drawn at random (`feature_map_cls`, one map for q and k)."""

    feature_map_cls: ClassVar[type]
    Options = RandomFeatureOptions
    positive_scale = True  # the features take sqrt(scale)

    def __init__(self, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **options):
        super().__init__(head_dim, num_heads, num_kv_heads, **options)
        self.feature_map = self.make_feature_map()

    def make_feature_map(self) -> torch.nn.Module:
        """The map for queries and keys: `feature_map_cls` built from the options (a subclass may pick another)."""
        o = self.opts
        return self.feature_map_cls(self.head_dim, o.num_features, o.seed, o.redraw, o.learn_features)

    @property
    def features(self) -> torch.Tensor:
        return self.feature_map.features

    def redraw_features(self) -> None:
        self.feature_map.redraw_features()

    @classmethod
    def defaults(cls, seq_len):
        return {"num_features": 256}

    @classmethod
    def test_options(cls, seq_len):
        return {"num_features": 64, "chunk_size": 8}
