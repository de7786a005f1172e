"""Capabilities, options, the result of a call, and the error family shared by every part of attnlab."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields

import torch


class AttnlabError(ValueError):
    """Base of every error attnlab raises on purpose: what was asked, what is allowed, what to do."""


class UnknownMethodError(AttnlabError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class OptionError(AttnlabError):
    """An option name or value a method does not accept."""


class UnsupportedError(AttnlabError):
    """A request (causal, mask, probs, length, dtype) a method declared it cannot serve."""


class ShapeError(AttnlabError):
    """Tensors whose shapes, dtypes or devices do not fit the contract."""


EXTRAS = ("lse", "col_sums")


@dataclass(frozen=True)
class Capabilities:
    """What a method can do. Checked before any compute; nothing falls back silently."""

    causal: bool = True  # can run causal (autoregressive) attention
    padding: bool = True  # honours key_padding_mask
    attn_mask: bool = False  # honours an arbitrary dense bool/float attn_mask
    block_mask: bool = False  # accepts a FlexAttention BlockMask as attn_mask
    probs: bool = False  # can return its implied attention matrix [B, H, Tq, Tk]
    gqa: bool = True  # accepts Hkv < H (grouped-query attention)
    cross: bool = True  # accepts Tq != Tk
    trainable: bool = False  # holds parameters meant to be trained (distillation)
    max_len: bool = False  # built for a maximum key length (option `max_len`)
    # its output has a different number of rows than q (reduce: ceil(ratio * Tq)): a layer of its own, never a
    # replacement for a model's attention (swap, compare, bench and vision leave it out)
    resizes: bool = False
    # extras computed blockwise besides `out`, never through a Tq x Tk matrix (need_lse / need_col_sums):
    # "lse": each query row's log-sum-exp of its scores [B, H, Tq]; "col_sums": the attention each key receives,
    # summed over the query rows [B, H, Tk]
    extras: tuple[str, ...] = ()
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def as_dict(self) -> dict:
        out = {}
        for f in fields(self):
            val = getattr(self, f.name)
            out[f.name] = [str(d).removeprefix("torch.") for d in val] if f.name == "dtypes" else (
                list(val) if isinstance(val, tuple) else val)
        return out


class AttnOutput(tuple):
    """What a method returns: the pair (out, probs), so `out, probs = method(...)` works, plus the extras asked
    for as attributes: `.lse` Float[B, H, Tq] (fp32; -inf for a row with no visible key) and `.col_sums`
    Float[B, H, Tk] (fp32), each None unless requested."""

    def __new__(cls, out: torch.Tensor, probs: torch.Tensor | None = None, *, lse=None, col_sums=None):
        self = super().__new__(cls, (out, probs))
        self.lse = lse
        self.col_sums = col_sums
        return self

    @property
    def out(self) -> torch.Tensor:
        return self[0]

    @property
    def probs(self) -> torch.Tensor | None:
        return self[1]


def check_int(method: str, name: str, value, low: int | None = None) -> None:
    """An int (not a bool), at least `low`."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise OptionError(f"{method}: {name} must be an int{bound}, got {value!r}")


def check_choice(method: str, name: str, value, choices) -> None:
    if value not in choices:
        raise OptionError(f"{method}: {name} must be one of {tuple(choices)}, got {value!r}")


def opt(default, help: str, *, low=None, high=None, choices=None, kind=None):
    """A method option: a dataclass field with a one-line help string (shown by `attnlab list`) and what values
    it takes, checked for every method by `validate_options` before anything is built:
    `kind` (default: the type of `default`; `object` skips the check), `low` / `high` bounds for numbers,
    `choices` for anything else. A default of None admits None besides `kind`."""
    meta = {"help": help, "low": low, "high": high, "choices": tuple(choices) if choices is not None else None,
            "kind": kind if kind is not None else type(default), "nullable": default is None}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def validate_options(method: str, options) -> None:
    """Check every field of an Options dataclass against the metadata `opt` recorded (type, bounds, choices)."""
    for f in dataclasses.fields(options):
        meta, value = f.metadata, getattr(options, f.name)
        if not meta or (value is None and meta.get("nullable")):
            continue
        kind = meta.get("kind")
        if kind is int:
            check_int(method, f.name, value, meta.get("low"))
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise OptionError(f"{method}: {f.name} must be a number, got {value!r}")
        elif kind is bool:
            if not isinstance(value, bool):
                raise OptionError(f"{method}: {f.name} must be true or false, got {value!r}")
        elif kind is str and not isinstance(value, str):
            raise OptionError(f"{method}: {f.name} must be a string, got {value!r}")
        if kind is float:
            low, high = meta.get("low"), meta.get("high")
            if (low is not None and value < low) or (high is not None and value > high):
                raise OptionError(f"{method}: {f.name} must be in [{low}, {high}], got {value!r}")
        elif kind is int and meta.get("high") is not None and value > meta["high"]:
            raise OptionError(f"{method}: {f.name} must be <= {meta['high']}, got {value!r}")
        if meta.get("choices") is not None:
            check_choice(method, f.name, value, meta["choices"])


def bad_option_values(options_cls) -> list[tuple[str, object]]:
    """(option, value) pairs that `validate_options` must refuse, derived from the metadata: the conformance
    suite feeds them to every registered method."""
    out = []
    for f in dataclasses.fields(options_cls):
        meta = f.metadata
        kind = meta.get("kind") if meta else None
        if kind is int:
            out += [(f.name, "seven"), (f.name, 2.5), (f.name, True)]
            if meta.get("low") is not None:
                out.append((f.name, meta["low"] - 1))
        elif kind is float:
            out.append((f.name, "x"))
            if meta.get("low") is not None:
                out.append((f.name, meta["low"] - 1.0))
        elif kind is bool:
            out.append((f.name, "yes"))
        elif kind is str and meta.get("choices"):
            out.append((f.name, "no-such-choice"))
    return out


def data_version(t: torch.Tensor):
    """A cache key for t's data without a device sync or a content hash: (storage pointer, version counter), which
    every in-place change (an optimizer step, load_state_dict, `with torch.no_grad(): t[...] = ...`) and every
    rebinding moves. Writes through `t.data` bypass the counter (it has its own), as for any version-keyed cache.
    A tensor made under torch.inference_mode has no counter: its key is a fresh object that equals nothing, so a
    cache keyed on it never serves (recomputed every call, never stale)."""
    if t.is_inference():
        return (t.data_ptr(), object())
    return (t.data_ptr(), t._version)


def records_grad(*tensors) -> bool:
    """Whether autograd records a call on these tensors: grad mode is on and any of them (None skipped) requires
    grad. The kernels choose their form by it (a backward needs saved state an inference forward can skip)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
