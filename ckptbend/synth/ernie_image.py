"""Tiny ERNIE-Image checkpoints from diffusers' `ErnieImageTransformer2DModel`.

Its single-file names are diffusers' own (diffusers' converter only strips `model.diffusion_model.`), so
`to_original` keeps them. h 32 = 2 heads × 16, 2 blocks. The all-in-one file carries neither its text encoder
(Ministral 3) nor a VAE.
"""

from __future__ import annotations

from . import dit

CONFIGS = {"ernie_image": dict(hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=8,
                               out_channels=8, patch_size=1, text_in_dim=24, rope_axes_dim=(4, 6, 6))}
ARCHES = tuple(CONFIGS)

FAMILY = dit.Family(transformer_class="ErnieImageTransformer2DModel", configs=CONFIGS, to_original=dict,
                    text_encoders={}, pipeline="ErnieImagePipeline", vae_prefix="vae.",
                    scheduler={"shift": 3.0, "use_dynamic_shifting": False})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
