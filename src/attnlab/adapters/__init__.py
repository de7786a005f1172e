"""Adapters put methods into a model: per-layer specs, swap/unswap/original, save/load, the MHA drop-in."""
from .spec import LayerPlan, Rule, SwapSpec
from .state import CheckpointError, Saved, load, save
from .swap import (attention_modules, attention_sites, method_modules, original, swap, swapped, swapped_layers,
                   swapped_spec, unswap)

__all__ = ["CheckpointError", "Saved", "LayerPlan", "Rule", "SwapSpec", "attention_modules", "attention_sites", "load", "method_modules",
           "original", "save", "swap", "swapped", "swapped_layers", "swapped_spec", "unswap"]
