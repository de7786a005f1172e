"""Adapters put a method into a model: `swap`/`unswap`/`swapped` and the MultiheadAttention drop-in."""
from .swap import attention_modules, swap, swapped, unswap

__all__ = ["attention_modules", "swap", "swapped", "unswap"]
