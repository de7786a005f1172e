"""The attention zoo: one method a file, all behind `AttentionMethod`."""
from .base import AttentionMethod, repeat_kv

__all__ = ["AttentionMethod", "repeat_kv"]
