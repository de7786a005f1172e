"""Elementwise chains fused by torch.compile: one generated kernel instead of one memory pass per op.

    @fused
    def features(x, w): ...              # plain PyTorch
    features(x, w)                       # eager
    features(x, w, compiled=True)        # through torch.compile(dynamic=True), compiled on first use

A feature map such as FAVOR+'s exp(x.w - |x|^2/2 - max) is five or six passes over a [B, H, T, m] fp32
tensor in eager mode (the bulk of a Performer's time at long lengths); compiled, the matmul is followed by
a single fused kernel, and autograd gets a fused backward too. Compilation uses dynamic shapes (one graph
for every length); the first compile raises dynamo's recompile limit to FUSED_RECOMPILE_LIMIT (process-wide,
never lowered), since a map is compiled for several grad / dtype / batch-1 variants in one run. Whether to compile is the calling method's choice (its `backend` option), never an
environment variable: the CPU tests run the same function eagerly (the same maths), and
benchmarks/gpu_checks.py compares the compiled path with it on CUDA.
"""
from __future__ import annotations

import functools
import importlib.util

import torch


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def compile_unavailable_reason(device) -> str | None:
    """Why torch.compile cannot generate kernels for `device` (None: it can)."""
    if torch.device(device).type == "cuda" and not triton_importable():
        return "torch.compile on CUDA needs triton, which is not installed"
    return None


def raise_recompile_limit(limit: int = 256) -> None:
    """Raise dynamo's per-function recompile limit (and the accumulated one) to at least `limit`, process-wide; never
    lowers them. At torch's default (8 per function) dynamo silently falls back to eager once a function has been
    compiled for 8 variants: flex_attention in a sweep (many impls, lengths, grad modes: eager flex builds the dense
    matrix and turns a sparse kernel into an OOM), and a fused feature map in distillation (`Fused`)."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 4 * limit))


# variants one fused function legitimately compiles for in a run: grad mode on or off, its input requiring grad
# or not (a distilled model's first layer's q, k do not, later layers' do), batch 1 (dynamic shapes still specialise
# 0 and 1), fp32 or bf16; 8 (torch's default) was hit by hedgehog's map in a hybrid distillation on the H200, which
# then ran eagerly for the rest of the run
FUSED_RECOMPILE_LIMIT = 64


class Fused:
    def __init__(self, fn):
        self.fn = fn
        self._compiled = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args, compiled: bool = False, **kwargs):
        if not compiled:
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            raise_recompile_limit(FUSED_RECOMPILE_LIMIT)  # once, process-wide, only upwards (see above)
            self._compiled = torch.compile(self.fn, dynamic=True)
        return self._compiled(*args, **kwargs)


def fused(fn) -> Fused:
    return Fused(fn)
