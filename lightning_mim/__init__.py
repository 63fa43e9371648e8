"""Masked image modeling for Vision Transformers on PyTorch Lightning."""
__version__ = "0.1.0"
