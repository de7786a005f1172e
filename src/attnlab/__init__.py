"""attnlab: swap cheaper attention into a Transformer and measure exactly what it costs.

Public API (nothing runs at import; methods register on first lookup):
    list_methods(), capabilities(name), options(name), make(name, head_dim=, num_heads=, **options)
"""
from .registry import capabilities, list_methods, make, options, register
from .types import AttnlabError, Capabilities, OptionError, ShapeError, UnknownMethodError, UnsupportedError

__version__ = "0.1.0"

__all__ = [
    "AttnlabError", "Capabilities", "OptionError", "ShapeError", "UnknownMethodError", "UnsupportedError",
    "capabilities", "list_methods", "make", "options", "register",
]
