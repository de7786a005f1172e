"""Sequence compression: an attention autoencoder that maps n tokens to ceil(ratio * n) latent vectors and back
(model.py, on the `reduce` method), its training (train.py), its folder on disk (store.py) and a lossy text
codec built on it (codec.py). CLI: `attnlab compress train | eval | encode | decode`."""
from .model import AutoencoderConfig, SequenceAutoencoder
from .store import load
from .train import TrainConfig, train

__all__ = ["AutoencoderConfig", "SequenceAutoencoder", "TrainConfig", "load", "train"]
