"""Elementwise chains fused by torch.compile on CUDA: one generated kernel instead of one memory pass per op.

    @fused
    def features(x, w): ...        # plain PyTorch; runs compiled on CUDA, eagerly elsewhere

A feature map such as FAVOR+'s exp(x.w - |x|^2/2 - max) is five or six passes over a [B, H, T, m] fp32
tensor in eager mode (the bulk of a Performer's time at long lengths); compiled, the matmul is followed by
a single fused kernel, and autograd gets a fused backward too. Compilation uses dynamic shapes (one graph
for every length) and happens on the first CUDA call. CPU runs the same function eagerly: the same math,
so the CPU tests check what the GPU compiles (benchmarks/gpu_checks.py runs the compiled path on CUDA).
Set ATTNLAB_NO_COMPILE=1 to run everything eagerly (debugging, or timing the eager path).
"""
from __future__ import annotations

import functools
import importlib.util
import os

import torch


@functools.cache
def _can_compile() -> bool:
    return os.environ.get("ATTNLAB_NO_COMPILE", "") in ("", "0") and importlib.util.find_spec("triton") is not None


def fused(fn):
    compiled = None

    @functools.wraps(fn)
    def wrapper(x: torch.Tensor, *args, **kwargs):
        nonlocal compiled
        if x.is_cuda and _can_compile():
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True)
            return compiled(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return wrapper
