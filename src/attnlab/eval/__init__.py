"""Evaluation: compare (fidelity of swapped models) and its tasks registry."""
