"""Tiny Ideogram 4 checkpoints from diffusers' `Ideogram4Transformer2DModel`: h 32 = 2 heads × 16, 2 blocks.

diffusers has no single-file converter for Ideogram 4; the original names are those of ComfyUI's Ideogram 4 module
(and of the released files): q | k | v stacked in `attention.qkv`, `attention.o` for `to_out.0`, all else equal.
Text encoder (Qwen3-VL) and VAE are not generated."""

from __future__ import annotations

import torch

from . import dit

CONFIGS = {"ideogram4": dict(in_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                             intermediate_size=48, adaln_dim=16, llm_features_dim=24, mrope_section=(4, 2, 2))}
ARCHES = tuple(CONFIGS)


def to_original(sd: dict) -> dict:
    out = {}
    for key, v in sd.items():
        if ".attention.to_k." in key or ".attention.to_v." in key:
            continue
        if ".attention.to_q." in key:
            out[key.replace(".to_q.", ".qkv.")] = torch.cat([sd[key.replace(".to_q.", f".to_{x}.")] for x in "qkv"])
        else:
            out[key.replace(".attention.to_out.0.", ".attention.o.")] = v
    return out


def to_diffusers(sd: dict) -> dict:
    """The inverse of `to_original` (what a loader of the original file does): split `qkv` in thirds."""
    out = {}
    for key, v in sd.items():
        if ".attention.qkv." in key:
            for x, part in zip("qkv", v.chunk(3)):
                out[key.replace(".qkv.", f".to_{x}.")] = part
        else:
            out[key.replace(".attention.o.", ".attention.to_out.0.")] = v
    return out


FAMILY = dit.Family(transformer_class="Ideogram4Transformer2DModel", configs=CONFIGS, to_original=to_original,
                    text_encoders={}, pipeline="Ideogram4Pipeline", vae_prefix="vae.", scheduler={"shift": 3.0})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
