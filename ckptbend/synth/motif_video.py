"""Tiny Motif-Video checkpoints from diffusers' `MotifVideoTransformer3DModel`: h 32 = 2 heads × 16, 2 dual-stream and
2 single-stream blocks, each with the optional text cross-attention. Its single file has diffusers' names (diffusers'
single-file mapping is the identity), so `to_original` keeps them. Text encoder and VAE are not generated."""

from __future__ import annotations

from . import dit

CONFIGS = {"motif_video": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                               num_single_layers=2, mlp_ratio=2.0, text_embed_dim=24, rope_axes_dim=(4, 6, 6),
                               enable_text_cross_attention_dual=True, enable_text_cross_attention_single=True)}
ARCHES = tuple(CONFIGS)

FAMILY = dit.Family(transformer_class="MotifVideoTransformer3DModel", configs=CONFIGS, to_original=dict,
                    text_encoders={}, pipeline="MotifVideoPipeline", vae_prefix="vae.", scheduler={"shift": 1.0})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
