"""Scylla: scaling laws of speculative decoding (arXiv 2505.07858), an open implementation."""
__version__ = "0.1.0"
