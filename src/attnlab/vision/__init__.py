"""Vision: every attention method in the same small ViT on Fashion-MNIST (`attnlab vision`)."""
from .data import CLASSES, fashion_mnist
from .train import VisionConfig, run_vision, summary_rows, train_one
from .vit import ViT, ViTConfig

__all__ = ["CLASSES", "ViT", "ViTConfig", "VisionConfig", "fashion_mnist", "run_vision", "summary_rows", "train_one"]
