"""Capabilities and the error family shared by every part of attnlab."""
from __future__ import annotations

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
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

    def as_dict(self) -> dict:
        out = {}
        for f in fields(self):
            val = getattr(self, f.name)
            out[f.name] = [str(d).removeprefix("torch.") for d in val] if f.name == "dtypes" else val
        return out


def check_int(method: str, name: str, value, low: int | None = None) -> None:
    """Option validation shared by every method: an int (not a bool), at least `low`."""
    if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
        bound = "" if low is None else f" >= {low}"
        raise OptionError(f"{method}: {name} must be an int{bound}, got {value!r}")


def check_choice(method: str, name: str, value, choices) -> None:
    if value not in choices:
        raise OptionError(f"{method}: {name} must be one of {tuple(choices)}, got {value!r}")


def opt(default, help: str):
    """A method option: a dataclass field with a one-line help string (shown by `attnlab list`)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})
