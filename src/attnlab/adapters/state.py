"""`attnlab.save(model, DIR)` / `attnlab.load(model, DIR)`: the swapped attention alone, no pickle.

DIR/attnlab.json        the spec (rules + seed), the per-layer plan, and the model it was made for
                        (architecture, number of attention layers, each layer's heads / kv heads / head dim)
DIR/attention.safetensors   every swapped layer's parameters and buffers, keys "layers.<index>.<name>"

`load` rebuilds the swap from the spec (or reuses it when the model already runs the same spec), checks the
model is the one the directory was made for, and puts the state back: outputs are bit-equal to the saved
model's. A directory for another architecture, layer count or head shape, a missing file, a truncated or
corrupt file: one clear AttnlabError each, before anything changes. Writes go to a temporary directory that
replaces DIR only when complete, so an interrupted save never leaves a half-written DIR behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..types import AttnlabError
from . import hf
from .spec import SwapSpec
from .swap import attention_sites, method_modules, state, swap, swapped_spec, unswap

FORMAT = "attnlab-attention/1"
SPEC_FILE = "attnlab.json"
STATE_FILE = "attention.safetensors"


class CheckpointError(AttnlabError):
    """A saved attention directory that is missing, corrupt, or made for another model."""


class Saved:
    """A saved attention directory, as something `attnlab.swapped(model, Saved(DIR))` (and compare) can take."""

    def __init__(self, path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Saved({str(self.path)!r})"

    def spec(self) -> SwapSpec:
        return SwapSpec.from_dict(read_meta(self.path)["spec"])


def fingerprint(model) -> dict:
    """What a saved attention must match: the architecture and every attention layer's head shape."""
    if hf.is_hf_model(model):
        sites = attention_sites(model)
    else:  # swapped or not, one nn.MultiheadAttention (torch's or attnlab's) per attention layer
        sites = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    shapes = []
    for _, mod in sites:
        if hf.is_hf_model(model):
            heads, kv, d = hf.head_shape(mod, model.config)
        else:
            heads, kv, d = mod.num_heads, mod.num_heads, mod.head_dim
        shapes.append([int(heads), int(kv), int(d)])
    return {"architecture": type(model).__name__, "num_layers": len(sites), "heads": shapes}


def state_tensors(model) -> dict[str, torch.Tensor]:
    """{"layers.<i>.<name>": tensor} for every swapped layer's parameters and buffers (contiguous, detached)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for plan, module in method_modules(model):
        for name, t in module.state_dict().items():
            key = f"layers.{plan.index}.{name}"
            t = t.detach()
            ident = (t.data_ptr(), t.dtype, tuple(t.shape), t.device) if t.numel() else None
            # one tensor reachable under two names (a map shared by queries and keys) is stored once per name:
            # safetensors refuses shared storage, so the second name gets its own copy
            out[key] = t.clone().contiguous().cpu() if ident in seen else t.contiguous().cpu()
            if ident is not None:
                seen[ident] = key
    return out


def save(model, directory, *, extra: dict | None = None) -> Path:
    """Write the swapped attention of `model` (spec + per-layer state) to `directory`; returns the path."""
    from safetensors.torch import save_file

    st = state(model)
    if st is None:
        raise AttnlabError("attnlab.save: nothing is swapped in (swap a method first)")
    directory = Path(directory)
    meta = {
        "format": FORMAT,
        "spec": st.spec.to_dict(),
        "layers": [p.to_dict() for p in st.plans],
        "model": fingerprint(model),
        "extra": extra or {},
    }
    import attnlab

    meta["attnlab_version"] = attnlab.__version__
    tensors = state_tensors(model)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / STATE_FILE), metadata={"format": FORMAT})
        (tmp / SPEC_FILE).write_text(json.dumps(meta, indent=1, default=str))
        _replace_dir(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the complete `src` into place as `dst`; an existing `dst` is swapped out only after `src` is complete."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def read_meta(directory) -> dict:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{str(directory)!r} is a file; a saved attention is the directory that holds "
                              f"{SPEC_FILE} and {STATE_FILE}")
    if not directory.is_dir():
        raise CheckpointError(f"attention directory {str(directory)!r} does not exist")
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise CheckpointError(f"{str(directory)!r} is not an attnlab attention directory ({SPEC_FILE} missing)")
    try:
        meta = json.loads(spec_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{spec_path} is corrupt (not JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{spec_path} is not an attnlab attention file (format {meta.get('format') if isinstance(meta, dict) else None!r}, "
                              f"expected {FORMAT!r})")
    return meta


@contextlib.contextmanager
def _refusing(path, what: str = ""):
    """The path as a str for a safetensors reader, and one CheckpointError for a missing (incomplete), corrupt or
    truncated file: the refusals `load_safetensors` and `check_safetensors` share."""
    from safetensors import SafetensorError

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{str(path.parent)!r} has no {path.name}{f' ({what})' if what else ''}")
    try:
        yield str(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({type(e).__name__}: {str(e)[:200]})") from None


def load_safetensors(path, what: str = "") -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, or one CheckpointError: missing (incomplete), corrupt or truncated. The one
    reader of every attnlab weights file (saved attention, trainer state, the compress autoencoder)."""
    from safetensors.torch import load_file

    with _refusing(path, what) as p:
        return load_file(p)


def check_safetensors(path, what: str = "") -> None:
    """`load_safetensors`' refusals without reading the tensors (milliseconds): the file is there and its header parses
    and covers the whole file, so a truncated or corrupt file fails before a command loads its model."""
    from safetensors import safe_open

    with _refusing(path, what) as p, safe_open(p, "pt"):
        pass


def check_saved(directory) -> dict:
    """A saved attention directory's metadata (`read_meta`), after its state file's header is checked too: what a
    command does with `--load` / `--init` before anything heavy."""
    meta = read_meta(directory)
    check_safetensors(Path(directory) / STATE_FILE)
    return meta


def read_tensors(directory) -> dict[str, torch.Tensor]:
    return load_safetensors(Path(directory) / STATE_FILE)


def check_fingerprint(model, meta: dict, directory) -> None:
    want, have = meta.get("model", {}), fingerprint(model)
    for key, what in (("architecture", "architecture"), ("num_layers", "number of attention layers")):
        if want.get(key) != have[key]:
            raise CheckpointError(f"{directory} was saved for a model with {what} {want.get(key)!r}; this model has "
                                  f"{have[key]!r}")
    for i, (w, h) in enumerate(zip(want.get("heads", []), have["heads"])):
        if list(w) != list(h):
            raise CheckpointError(f"{directory} was saved for attention layer {i} with (heads, kv heads, head dim) "
                                  f"{tuple(w)}; this model's layer {i} has {tuple(h)}")


def load(model, directory):
    """Put the attention saved in `directory` into `model` (swapping it in when needed). Returns the model."""
    meta = read_meta(directory)
    check_fingerprint(model, meta, directory)
    spec = SwapSpec.from_dict(meta["spec"])
    spec.validate()  # a method that no longer exists fails here, before anything changes
    tensors = read_tensors(directory)
    current = swapped_spec(model)
    if current is not None and current.to_dict() != spec.to_dict():
        raise CheckpointError(f"model already runs {current.describe()!r}, not the saved {spec.describe()!r}; "
                              "call attnlab.unswap(model) first")
    fresh = current is None
    if fresh:
        swap(model, spec)
    try:
        _load_tensors(model, tensors, directory)
    except Exception:
        if fresh:
            unswap(model)
        raise
    return model


def _load_tensors(model, tensors: dict, directory) -> None:
    expected = set()
    for plan, module in method_modules(model):
        prefix = f"layers.{plan.index}."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        want = module.state_dict()
        expected |= {prefix + k for k in want}
        missing = sorted(set(want) - set(own))
        if missing:
            raise CheckpointError(f"{directory}: layer {plan.index} ({plan.method}) misses {missing[:5]} in {STATE_FILE}")
        for k, v in own.items():
            if k in want and tuple(v.shape) != tuple(want[k].shape):
                raise CheckpointError(f"{directory}: layer {plan.index} {k} has shape {tuple(v.shape)}, the method "
                                      f"expects {tuple(want[k].shape)}")
        module.load_state_dict({k: v for k, v in own.items() if k in want}, strict=True)
        for sub in module.modules():  # cached BlockMasks of patterns whose buffers were rewritten
            if hasattr(sub, "touch"):
                sub.touch()
    extra = sorted(set(tensors) - expected)
    if extra:
        raise CheckpointError(f"{directory}: {STATE_FILE} holds tensors no layer of the spec uses: {extra[:5]}")
