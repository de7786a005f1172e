"""Fidelity of a swapped model against the same model unmodified, without fine-tuning."""
from .fidelity import (
    TARGETS, attention_mse, capture_probs, probs_mse, swapped_probs, grad_cosine, kl_per_token, next_token_stats, peak_cpu_memory,
)

__all__ = [
    "TARGETS", "attention_mse", "capture_probs", "probs_mse", "swapped_probs", "grad_cosine", "kl_per_token", "next_token_stats", "peak_cpu_memory",
]
