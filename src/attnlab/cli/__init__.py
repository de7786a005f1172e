"""`attnlab` command line: one entry point, subcommands (list, compare, bench, data)."""
from __future__ import annotations

import argparse
import sys

from .types import AttnlabError


def _cmd_list(args) -> int:
    from . import registry

    names = registry.list_methods()
    if args.json:
        import json

        print(json.dumps({n: {"capabilities": registry.capabilities(n).as_dict(),
                              "options": {k: d for k, (d, _) in registry.options(n).items()}} for n in names},
                         indent=2, default=str))
        return 0
    flags = ("causal", "padding", "attn_mask", "block_mask", "probs", "gqa", "cross", "trainable", "max_len")
    head = f"{'method':<14}" + "".join(f"{f:>11}" for f in flags)
    print(head)
    print("-" * len(head))
    for n in names:
        caps = registry.capabilities(n)
        print(f"{n:<14}" + "".join(f"{('yes' if getattr(caps, f) else '-'):>11}" for f in flags))
    print()
    for n in names:
        cls = registry.get(n)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        print(f"{n}: {doc}")
        for opt, (default, help_) in registry.options(n).items():
            print(f"    {opt} = {default!r}  {help_}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlab", description="Swap cheaper attention into a Transformer and measure the cost.")
    sub = p.add_subparsers(dest="cmd", required=True)
    pl = sub.add_parser("list", help="every attention method with its capabilities and options")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=_cmd_list)
    from . import compare_cli, data_cli
    from .bench import cli as bench_cli

    for module in (compare_cli, bench_cli, data_cli):
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except AttnlabError as e:
        print(f"attnlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
