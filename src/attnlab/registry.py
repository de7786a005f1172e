"""Name -> method class. `attnlab list` is this registry printed."""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
from typing import TYPE_CHECKING

from .types import Capabilities, OptionError, UnknownMethodError

if TYPE_CHECKING:
    from .methods.base import AttentionMethod

_REGISTRY: dict[str, type["AttentionMethod"]] = {}

# Method modules are imported on first lookup, not at `import attnlab` (no import-time work).
_METHOD_MODULES = (
    "dense", "sdpa", "linear", "performer", "rfa", "linformer", "nystrom", "lsh", "window", "block_sparse",
)


def register(name: str):
    """Class decorator: put a method under `name`. A duplicate name is an error, never an overwrite."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"attention method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtin() -> None:
    # tests/test_registry.py asserts the full list, so a module missing here cannot go unnoticed.
    for mod in _METHOD_MODULES:
        if importlib.util.find_spec(f"attnlab.methods.{mod}") is not None:
            importlib.import_module(f"attnlab.methods.{mod}")


def list_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get(name: str) -> type["AttentionMethod"]:
    _load_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown attention method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}"
        ) from None


def capabilities(name: str) -> Capabilities:
    return get(name).capabilities


def options(name: str) -> dict[str, tuple[object, str]]:
    """{option: (default, help)} for a method."""
    cls = get(name)
    out = {}
    for f in dataclasses.fields(cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = (default, f.metadata.get("help", ""))
    return out


def make(name: str, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **opts) -> "AttentionMethod":
    """Build one method instance (an nn.Module) for a layer with `num_heads` heads of size `head_dim`."""
    cls = get(name)
    valid = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(opts) - valid)
    if unknown:
        raise OptionError(
            f"method {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(sorted(valid)) or '(none)'}"
        )
    return cls(head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, **opts)
