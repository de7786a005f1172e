"""attnlab: swap cheaper attention into a Transformer and measure exactly what it costs.

Public API (nothing runs at import; methods are found on first lookup):
    list_methods(), capabilities(name), options(name), defaults(name, seq_len), make(name, head_dim=, num_heads=, **options)
    swap(model, spec, **options), unswap(model), swapped(model, spec, **options), original(model)
    swapped_spec(model), swapped_layers(model), SwapSpec, Rule, save(model, dir), load(model, dir), Saved(dir)
    distill(model, spec, tokenizer=, out=, ...)  (train only the swapped attention; attnlab.train.DistillConfig)
    replace_mha(model, name), nn.MultiheadAttention (drop-in for torch.nn.MultiheadAttention)
    patterns (sparsity patterns), feature_maps (kernel feature maps), AttnOutput (out, probs + .lse, .col_sums)
"""
from . import data, models, nn
from .adapters import (CheckpointError, Rule, Saved, SwapSpec, attention_modules, load, original, save, swap, swapped, swapped_layers,
                       swapped_spec, unswap)
from .adapters.mha import replace_mha
from .registry import capabilities, defaults, list_methods, make, options, register
from .types import (AttnlabError, AttnOutput, Capabilities, OptionError, ShapeError, UnknownMethodError,
                    UnsupportedError)

__version__ = "0.2.0"

__all__ = [
    "AttnOutput", "AttnlabError", "Capabilities", "CheckpointError", "OptionError", "Rule", "Saved", "ShapeError", "SwapSpec", "UnknownMethodError",
    "UnsupportedError", "attention_modules", "capabilities", "data", "defaults", "list_methods", "load", "make",
    "models", "nn", "options", "original", "register", "replace_mha", "save", "swap", "swapped", "swapped_layers",
    "swapped_spec", "unswap", "distill", "patterns", "feature_maps",
]


def distill(model, spec, *, tokenizer, out, config=None, resume: bool = False, device=None, autocast_dtype=None,
            **overrides):
    """Train only the swapped attention of `model` to match the original model (forward KL on held-out text) and
    return the result row; `spec` a method name, a per-layer spec or a SwapSpec, its omitted options the methods'
    at `seq_len`. Fields of `attnlab.train.DistillConfig` (steps, seq_len, batch_size, lr, ...) as keyword
    arguments or `config`. See `attnlab.train.distill.distill`."""
    from .train.distill import distill as _distill

    return _distill(model, spec, tokenizer=tokenizer, out=out, config=config, resume=resume, device=device,
                    autocast_dtype=autocast_dtype, **overrides)


def __getattr__(name):  # subpackages loaded on first use (nothing heavy at import)
    if name in ("patterns", "feature_maps", "ops", "bench", "metrics", "train"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
