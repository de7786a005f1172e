"""attnlab: swap cheaper attention into a Transformer and measure exactly what it costs.

Public API (nothing runs at import; methods register on first lookup):
    list_methods(), capabilities(name), options(name), make(name, head_dim=, num_heads=, **options)
    swap(model, name, **options), unswap(model), swapped(model, name, **options), replace_mha(model, name)
    nn.MultiheadAttention (drop-in for torch.nn.MultiheadAttention)
"""
from . import data, models, nn
from .adapters import attention_modules, swap, swapped, unswap
from .adapters.mha import replace_mha
from .registry import capabilities, list_methods, make, options, register
from .types import AttnlabError, Capabilities, OptionError, ShapeError, UnknownMethodError, UnsupportedError

__version__ = "0.1.0"

__all__ = [
    "AttnlabError", "Capabilities", "OptionError", "ShapeError", "UnknownMethodError", "UnsupportedError",
    "attention_modules", "capabilities", "data", "list_methods", "make", "models", "nn", "options", "register", "replace_mha",
    "swap", "swapped", "unswap",
]
