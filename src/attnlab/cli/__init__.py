"""`attnlab` command line: one entry point, subcommands registered in COMMANDS (argparse only; the work lives in
the library). User errors are one line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..types import AttnlabError

# subcommand modules, each with add_parser(subparsers) whose parser sets func=run(args)
COMMANDS = ("list", "compare", "harness", "scan", "advise", "distill", "sparsify", "prune", "press", "compress",
            "vision", "bench", "data")


class OneLineParser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a bad choice, a non-integer) as one line too, naming --help."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import attnlab

    p = OneLineParser(prog="attnlab", description="Swap cheaper attention into a Transformer and measure "
                                                             "exactly what it costs.")
    p.add_argument("--version", action="version", version=f"attnlab {attnlab.__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{" + ",".join(COMMANDS) + "}",
                           parser_class=OneLineParser)
    for name in COMMANDS:
        importlib.import_module(f".{name}_cmd" if name == "list" else f".{name}", __name__).add_parser(sub)
    return p


def _close_bars() -> None:
    """Progress bars still open when an error ends the command are closed first, so the error starts a line of its
    own (a bar's carriage returns would otherwise put it on the bar's line, in a pipe too)."""
    std = sys.modules.get("tqdm.std")
    for bar in list(getattr(getattr(std, "tqdm", None), "_instances", None) or ()):
        bar.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is not None:
        args.command = "attnlab " + " ".join(argv)
    if getattr(args, "no_progress", False):  # transformers' own bars too ("Loading weights")
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    try:
        if getattr(args, "out", None) is not None:  # every command's results folder, before any of its work
            from .common import check_out_folder

            check_out_folder(args.out)
        return int(args.func(args) or 0)
    except AttnlabError as e:
        _close_bars()
        print(f"attnlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `attnlab list | head`: the reader left; not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
