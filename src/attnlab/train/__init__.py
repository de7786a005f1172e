"""Training the swapped attention: distillation (KL to the original model), its data, losses and checkpoints."""
from .distill import DistillConfig, distill

__all__ = ["DistillConfig", "distill"]
