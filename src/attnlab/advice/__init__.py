"""Advice: which attention each layer can take (`attnlab scan`: per-layer sensitivity)."""
from .scan import scan

__all__ = ["scan"]
