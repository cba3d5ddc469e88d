"""Tiny Kandinsky 5 checkpoints from diffusers' `Kandinsky5Transformer3DModel`. Its single-file names are diffusers'
own (ComfyUI detects and loads them as they are), so `to_original` keeps them. Width 32 = 2 heads × 16 (head width
= sum of the RoPE axes), 1 text block, 2 visual blocks; no text encoders (Qwen2.5-VL, CLIP-L) or VAE."""

from __future__ import annotations

from . import dit

CONFIGS = {"kandinsky5": dict(in_visual_dim=4, in_text_dim=24, in_text_dim2=20, time_dim=16, out_visual_dim=4,
                              patch_size=(1, 2, 2), model_dim=32, ff_dim=48, num_text_blocks=1, num_visual_blocks=2,
                              axes_dims=(4, 6, 6))}
ARCHES = tuple(CONFIGS)

FAMILY = dit.Family(transformer_class="Kandinsky5Transformer3DModel", configs=CONFIGS, to_original=dict,
                    text_encoders={}, pipeline="Kandinsky5T2VPipeline", vae_prefix="vae.", scheduler={"shift": 10.0})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
