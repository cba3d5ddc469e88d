"""Tiny HunyuanVideo 1.5 checkpoints from diffusers' `HunyuanVideo15Transformer3DModel`: diffusers names only
(one file, or a pipeline folder). diffusers 0.42.1 has no single-file converter for HunyuanVideo 1.5, so there is
nothing to check original names against; tests/test_dit_hunyuan15.py builds its original-named files from the
double blocks, whose names diffusers' HunyuanVideo converter does check. h 32 = 2 heads × 16, 2 double blocks."""

from __future__ import annotations

from ..errors import CkptbendError
from . import dit

CONFIGS = {"hunyuan_video15": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                   num_layers=2, num_refiner_layers=1, text_embed_dim=24, text_embed_2_dim=20,
                                   image_embed_dim=12, rope_axes_dim=(4, 6, 6), target_size=64, task_type="t2v")}
ARCHES = tuple(CONFIGS)
LAYOUTS = ("transformer_diffusers", "diffusers")

FAMILY = dit.Family(transformer_class="HunyuanVideo15Transformer3DModel", configs=CONFIGS, to_original=None,
                    text_encoders={}, pipeline="HunyuanVideo15Pipeline", vae_prefix="vae.", scheduler={"shift": 7.0})


def write_checkpoint(path, arch, layout="transformer_diffusers", size="tiny", dtype=None, seed=0, shard_size=None):
    if layout not in LAYOUTS:
        raise CkptbendError(f"synth: {arch} has no layout {layout!r} (one of {', '.join(LAYOUTS)}): its original "
                            "names cannot be checked against a converter")
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
