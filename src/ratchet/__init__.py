"""Ratchet: reproducible, distributed, tracked PyTorch training pipelines."""

__version__ = "0.1.0"
