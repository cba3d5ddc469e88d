"""Sampling-time techniques that cannot be baked into weights, as plain torch functions.

sag.py (Self-Attention Guidance), slothful.py (Slothful Attention) and bending.py (Attention
Bending) import only torch, math and the standard library: they are copied verbatim into the
companion folder and into the ComfyUI custom node. Host adapters (diffusers, ComfyUI) only wire
them in.
"""
