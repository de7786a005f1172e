"""One way to time a call, shared by compare, bench and the training loops: CUDA events on a GPU (the device
work, not the launch), `time.perf_counter` after a synchronise elsewhere. Milliseconds."""
from __future__ import annotations

import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """with Timer(device) as t: ...   then t.ms"""

    def __init__(self, device="cpu"):
        self.device = torch.device(device)
        self.ms: float | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self._end.record()
            self._end.synchronize()
            self.ms = self._start.elapsed_time(self._end)
        else:
            self.ms = (time.perf_counter() - self._t0) * 1e3
        return False


def time_ms(fn, device="cpu") -> tuple[object, float]:
    """(fn(), milliseconds)."""
    with Timer(device) as t:
        out = fn()
    return out, t.ms
