"""Decoding: plain autoregressive, chain, static and dynamic (EAGLE-2) trees, prompt lookup.

``METHODS[name](target, prompts, cfg, draft) -> DecodeResult`` is what ``scylla bench`` and
``scylla generate`` call; every speculative method shares one engine (``engine.Decoder``) and one
verification rule (``verify``), lossless at T = 0 and T > 0, at any batch size.
"""
from scylla.decoding.methods import METHODS

__all__ = ["METHODS"]
