"""Elementwise chains fused by torch.compile: one generated kernel instead of one memory pass per op.

    @fused
    def features(x, w): ...              # plain PyTorch
    features(x, w)                       # eager
    features(x, w, compiled=True)        # through torch.compile(dynamic=True), compiled on first use

A feature map such as FAVOR+'s exp(x.w - |x|^2/2 - max) is five or six passes over a [B, H, T, m] fp32
tensor in eager mode (the bulk of a Performer's time at long lengths); compiled, the matmul is followed by
a single fused kernel, and autograd gets a fused backward too. Compilation uses dynamic shapes (one graph
for every length). Whether to compile is the calling method's choice (its `backend` option), never an
environment variable: the CPU tests run the same function eagerly (the same maths), and
benchmarks/gpu_checks.py compares the compiled path with it on CUDA.
"""
from __future__ import annotations

import functools
import importlib.util

import torch


def compile_unavailable_reason(device) -> str | None:
    """Why torch.compile cannot generate kernels for `device` (None: it can)."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs triton, which is not installed"
    return None


class Fused:
    def __init__(self, fn):
        self.fn = fn
        self._compiled = None
        functools.update_wrapper(self, fn)

    def __call__(self, *args, compiled: bool = False, **kwargs):
        if not compiled:
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        return self._compiled(*args, **kwargs)


def fused(fn) -> Fused:
    return Fused(fn)
