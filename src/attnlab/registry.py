"""Name -> method class. `attnlab list` is this registry printed.

A method is one file: a module under `attnlab/methods/` whose class carries `@register("name")`. The registry
finds those files itself (every module of the package not starting with "_", on first lookup, never at
`import attnlab`), so adding a method is adding a file. Methods outside attnlab are plugins: a distribution
that declares an entry point in the group "attnlab.methods" (value: the module to import) is imported the
same way, e.g. in pyproject.toml

    [project.entry-points."attnlab.methods"]
    mymethod = "mypackage.mymethod"
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import pkgutil
from typing import TYPE_CHECKING

from .types import Capabilities, OptionError, UnknownMethodError, validate_options

if TYPE_CHECKING:
    from .methods.base import AttentionMethod

_REGISTRY: dict[str, type["AttentionMethod"]] = {}
ENTRY_POINT_GROUP = "attnlab.methods"
_loaded = False
_plugin_errors: dict[str, str] = {}


def register(name: str):
    """Class decorator: put a method under `name`. A duplicate name is an error, never an overwrite."""

    def deco(cls):
        old = _REGISTRY.get(name)
        if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"attention method {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _discover() -> None:
    """Import every built-in method file and every plugin module, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from . import methods

    for info in pkgutil.iter_modules(methods.__path__):
        if not info.name.startswith("_") and info.name != "base":
            importlib.import_module(f"{methods.__name__}.{info.name}")
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            importlib.import_module(ep.value.split(":")[0])
        except Exception as e:  # noqa: BLE001 - a broken plugin must not hide the built-in methods
            _plugin_errors[ep.name] = f"{type(e).__name__}: {e}"


def rediscover() -> None:
    """Look for method files and plugins again (after installing a plugin in a running process)."""
    global _loaded
    _loaded = False
    _discover()


def plugin_errors() -> dict[str, str]:
    """Plugins that were found but failed to import: {entry point name: error}."""
    _discover()
    return dict(_plugin_errors)


def list_methods() -> list[str]:
    _discover()
    return sorted(_REGISTRY)


def standalone_methods() -> list[str]:
    """Methods that run from their defaults alone (not those built from data, like global_sparse's pattern) and
    keep the sequence length (not reduce): what "every method" means in compare, bench and vision."""
    return [n for n in list_methods() if not get(n).requires and not get(n).capabilities.resizes]


def get(name: str) -> type["AttentionMethod"]:
    _discover()
    try:
        return _REGISTRY[name]
    except KeyError:
        hint = "".join(f"; plugin {n!r} failed to import ({e})" for n, e in _plugin_errors.items())
        raise UnknownMethodError(
            f"unknown attention method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))}{hint}"
        ) from None


def capabilities(name: str) -> Capabilities:
    """What a method can serve: causal, padding, arbitrary masks, probabilities, extras (lse, col_sums), GQA, dtypes,
    cross-attention, whether it trains or resizes the sequence."""
    return get(name).capabilities


def options(name: str) -> dict[str, tuple[object, str]]:
    """{option: (default, help)} for a method."""
    cls = get(name)
    out = {}
    for f in dataclasses.fields(cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out[f.name] = (default, f.metadata.get("help", ""))
    return out


def _check_names(name: str, opts: dict) -> None:
    """Unknown option names are an error that lists the valid ones."""
    valid = {f.name for f in dataclasses.fields(get(name).Options)}
    unknown = sorted(set(opts) - valid)
    if unknown:
        raise OptionError(
            f"method {name!r} has no option(s) {', '.join(map(repr, unknown))}; "
            f"valid options: {', '.join(sorted(valid)) or '(none)'}"
        )


def check_options(name: str, opts: dict) -> None:
    """Option names, then values as the method's Options check them (types, bounds, choices, combinations),
    without building the method: what the CLIs run before any heavy work. A method built from data
    (global_sparse's pattern) meets a layer's shape only when the swap builds it."""
    _check_names(name, opts)
    validate_options(name, get(name).Options(**opts))


def make(name: str, head_dim: int, num_heads: int, num_kv_heads: int | None = None, **opts) -> "AttentionMethod":
    """Build one method instance (an nn.Module) for a layer with `num_heads` heads of size `head_dim`."""
    cls = get(name)
    _check_names(name, opts)  # the values are checked by the method's own __init__
    return cls(head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads, **opts)


def defaults(name: str, seq_len: int, given: dict | None = None) -> dict:
    """The options a method uses at sequence length `seq_len` unless told otherwise (the method owns them). `given`:
    the options the caller sets, for a default that depends on one of them (learned_mask's max_blocks on its
    block_size); a method's `defaults` that takes no `given` is called without it."""
    fn = get(name).defaults
    if given and "given" in inspect.signature(fn).parameters:
        return dict(fn(seq_len, given=dict(given)))
    return dict(fn(seq_len))


def options_at(name: str, seq_len: int, given: dict | None = None) -> dict:
    """A method's options at `seq_len`: `given` over its defaults there, what every command that knows its length
    builds (--methods, --set and a spec rule's options alike)."""
    given = dict(given or {})
    return {**defaults(name, seq_len, given), **given}
