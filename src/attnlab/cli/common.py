"""What every subcommand shares: the one option-override parser (`--set METHOD.OPTION=VALUE`), the one
environment record written into every result file, argument checks that fail in one line, and the results
folder default (outside the source tree)."""
from __future__ import annotations

import argparse
import ast
import json
import platform
import shlex
import sys
from pathlib import Path

import torch

from ..types import AttnlabError


# ---- --set METHOD.OPTION=VALUE ------------------------------------------------------------------------------
def add_set_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="METHOD.OPTION=VALUE",
                   help="override a method option, e.g. --set window.window=64 (repeatable; values are Python/JSON "
                        "literals: 64, 0.5, true, 'elu', [1, 2])")


def parse_value(raw: str):
    """'64' -> 64, '0.5' -> 0.5, 'true'/'false' -> bool, JSON/Python literals, anything else a string."""
    low = raw.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for parse in (json.loads, ast.literal_eval):
        try:
            return parse(raw)
        except (ValueError, SyntaxError, TypeError):
            pass
    return raw


def parse_overrides(items: list[str] | None, methods: list[str] | None = None) -> dict[str, dict]:
    """['window.window=64', ...] -> {'window': {'window': 64}}. With `methods`, a method outside them is an error."""
    out: dict[str, dict] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        method, dot, name = key.partition(".")
        if not sep or not dot or not method or not name:
            raise AttnlabError(f"--set expects METHOD.OPTION=VALUE, got {item!r}")
        if methods is not None and method not in methods:
            raise AttnlabError(f"--set {item!r}: method {method!r} is not among the methods of this run {methods}")
        out.setdefault(method, {})[name] = parse_value(raw)
    return out


# ---- one environment record -----------------------------------------------------------------------------------
def environment(device: str | torch.device = "cpu") -> dict:
    """Machine and versions, recorded in every result file (compare, bench, distill)."""
    import attnlab

    dev = torch.device(device)
    env = {
        "device": dev.type,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine()),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "attnlab_version": attnlab.__version__,
        "cpu_threads": torch.get_num_threads(),
        "transformers_version": None,
        "triton_version": None,
    }
    for mod, key in (("transformers", "transformers_version"), ("triton", "triton_version")):
        try:
            env[key] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            pass
    return env


def command_line(argv: list[str] | None = None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return "attnlab " + shlex.join(args)


def git_commit() -> str | None:
    """The source tree's commit, when attnlab runs from a git checkout (results name what produced them), with
    "+dirty" when attnlab's own sources differ from it (the result came from uncommitted code)."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=normal", "--", str(here.parent)],
                                cwd=here, capture_output=True, text=True, timeout=5)
        dirty = status.returncode == 0 and bool(status.stdout.strip())  # changed, staged or new source files
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() + ("+dirty" if dirty else "")


# ---- argument checks: one line, before anything heavy ---------------------------------------------------------
def positive_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise AttnlabError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def fraction(name: str, value, *, open_low: bool = True) -> float:
    """A ratio in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= 1 if open_low else 0 <= value <= 1):
        raise AttnlabError(f"{name} must be in {'(0, 1]' if open_low else '[0, 1]'}, got {value!r}")
    return float(value)


def fraction_list(name: str, raw: str, *, upper_open: bool = False, what: str = "fractions") -> list[float]:
    """A comma-separated list of fractions: each in (0, 1], or in [0, 1) with `upper_open`."""
    try:
        vals = [float(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise AttnlabError(f"{name} expects numbers such as 0.5,0.9, got {raw!r}") from None
    if not vals:
        raise AttnlabError(f"{name} needs at least one value")
    span = "[0, 1)" if upper_open else "(0, 1]"
    bad = [v for v in vals if not (0 <= v < 1 if upper_open else 0 < v <= 1)]
    if bad:
        raise AttnlabError(f"{name} values must be in {span} ({what}), got {bad}")
    return vals


def int_list(name: str, raw: str) -> list[int]:
    """Comma-separated integers >= 1 (lengths, bounds, bit widths), or one clear error."""
    try:
        vals = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise AttnlabError(f"{name} must be comma-separated integers, got {raw!r}") from None
    if not vals or min(vals) < 1:
        raise AttnlabError(f"{name} must be comma-separated integers >= 1, got {raw!r}")
    return vals


def name_list(raw: str | None, flag: str = "--methods") -> list[str] | None:
    """A comma list given on the command line (None when the flag was not given): given but empty ("" or ",") is
    an error, never the default list in silence."""
    if raw is None:
        return None
    names = [m.strip() for m in raw.split(",") if m.strip()]
    if not names:
        raise AttnlabError(f"{flag} is empty")
    return names


def causal_method_options(raw: str, overrides: list[str] | None, seq_len: int) -> dict[str, dict]:
    """--methods a,b plus --set overrides -> {method: options at seq_len (its defaults + overrides)}, each method
    known, able to run causal attention, its options checked: all before a model loads."""
    from .. import registry

    methods = name_list(raw)
    for m in methods:
        registry.get(m)
        if not registry.capabilities(m).causal:
            raise AttnlabError(f"method {m!r} cannot do causal attention (this command works on causal LMs)")
    over = parse_overrides(overrides, methods)
    opts = {m: registry.options_at(m, seq_len, over.get(m)) for m in methods}
    for m in methods:
        registry.check_options(m, opts[m])  # bad options fail here, before the model loads
    return opts


def check_device(device: str) -> str:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise AttnlabError(f"--device {device!r} is not a device (cpu, cuda, cuda:0, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AttnlabError(f"--device {device} asked for, but torch sees no CUDA device; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise AttnlabError(f"--device {device!r}: attnlab runs on cpu or cuda")
    return device


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32, "fp64": torch.float64, "float64": torch.float64}


def add_model_run_arguments(p: argparse.ArgumentParser, kind: str, writes: str) -> None:
    """--device, --dtype (the model's), --out (default ./attnlab-results/KIND), --no-plot, --no-progress: what every
    command that runs a packaged model and writes results takes."""
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model dtype")
    p.add_argument("--out", default=str(default_results_dir(kind)), help=f"folder for {writes} (default: %(default)s)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def check_out_folder(raw, flag: str = "--out") -> Path:
    """An output folder that can be made or written: not an existing file, no file on its way up, writable where it
    starts. Checked before any work (attnlab's main does it for every command's --out), so a run is never lost at
    the end to a path that could not take its results."""
    import os
    import tempfile

    path = Path(raw)
    if path.is_symlink() and not path.exists():
        raise AttnlabError(f"{flag} {str(raw)!r} is a link to nothing ({os.readlink(path)})")
    if path.exists() and not path.is_dir():
        raise AttnlabError(f"{flag} {str(raw)!r} is a file, not a folder")
    first = path.absolute()
    while not first.exists():
        first = first.parent
    if not first.is_dir():
        raise AttnlabError(f"{flag} {str(raw)!r}: {first} is a file, so the folder cannot be made")
    if not os.access(first, os.W_OK | os.X_OK):
        raise AttnlabError(f"{flag} {str(raw)!r}: {first} is not writable")
    try:  # os.access says yes to root everywhere (/proc too): a file made and removed is the proof
        with tempfile.TemporaryFile(dir=first):
            pass
    except OSError as e:
        raise AttnlabError(f"{flag} {str(raw)!r}: nothing can be written in {first} ({e.strerror or e})") from None
    return path


def write_result(path, device, fields: dict, plot=None) -> Path:
    """PATH (JSON): the command, commit and environment, then `fields`; and, unless `plot` is None, PATH's .png
    drawn by plot(png_path). Prints what it wrote. The one result writer of compare, scan, sparsify and vision."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"command": command_line(), "commit": git_commit(), "environment": environment(device), **fields}
    path.write_text(json.dumps(result, indent=2, default=str))
    print(f"\nwrote {path}")
    if plot is not None:
        png = path.with_suffix(".png")
        plot(png)
        print(f"wrote {png}")
    return path


def default_results_dir(kind: str) -> Path:
    """Where results go unless --out says otherwise: ./attnlab-results/<kind> (never inside the package)."""
    return Path("attnlab-results") / kind
