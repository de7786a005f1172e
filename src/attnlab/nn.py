"""`attnlab.nn.MultiheadAttention`: the torch.nn.MultiheadAttention drop-in."""
from .adapters.mha import MultiheadAttention, replace_mha, restore_mha

__all__ = ["MultiheadAttention", "replace_mha", "restore_mha"]
