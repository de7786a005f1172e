"""`attnlab list`: the method registry printed (capabilities, extras, every option with its default and help)."""
from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("list", help="every attention method with its capabilities and options",
                       description="Every registered attention method (plugins included): capabilities, extras, and "
                                   "every option with its default and help.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import registry

    names = registry.list_methods()
    if args.json:
        print(json.dumps({n: {"capabilities": registry.capabilities(n).as_dict(),
                              "options": {k: d for k, (d, _) in registry.options(n).items()},
                              "requires": list(registry.get(n).requires),
                              "complexity": dict(zip(("time", "memory", "symbols"), registry.get(n).complexity))}
                          for n in names},
                         indent=2, default=str))
        return 0
    flags = ("causal", "padding", "attn_mask", "block_mask", "probs", "gqa", "cross", "trainable", "max_len")
    head = f"{'method':<14}" + "".join(f"{f:>11}" for f in flags) + "  extras"
    print(head)
    print("-" * len(head))
    for n in names:
        caps = registry.capabilities(n)
        print(f"{n:<14}" + "".join(f"{('yes' if getattr(caps, f) else '-'):>11}" for f in flags)
              + "  " + (",".join(caps.extras) or "-"))
    print()
    for n in names:
        cls = registry.get(n)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{n}: {doc}")
        for opt, (default, help_) in registry.options(n).items():
            print(f"    {opt} (required)  {help_}" if opt in cls.requires else f"    {opt} = {default!r}  {help_}")
    errors = registry.plugin_errors()
    for name, err in errors.items():
        print(f"plugin {name!r} failed to import: {err}")
    return 0
