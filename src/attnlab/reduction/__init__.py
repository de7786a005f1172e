"""Token and pair reduction: data-informed global sparse patterns (`global_sparse`)."""
from .global_sparse import GlobalPattern, load_pattern, make_pattern, measure_block_mass, save_pattern, select_blocks

__all__ = ["GlobalPattern", "load_pattern", "make_pattern", "measure_block_mass", "save_pattern", "select_blocks"]
