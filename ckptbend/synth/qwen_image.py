"""Tiny Qwen-Image checkpoints from diffusers' `QwenImageTransformer2DModel`.

Qwen-Image's single-file names are diffusers' own (diffusers' single-file mapping for this class is the
identity), so `to_original` keeps them; ComfyUI stores them under `model.diffusion_model.` with the
Qwen2.5-VL text encoder under `text_encoders.qwen25_7b.transformer.`. h 32 = 2 heads × 16, 2 blocks.
The all-in-one file carries no VAE here (Qwen-Image's VAE is Wan's; ckptbend leaves a VAE alone).
"""

from __future__ import annotations

from . import dit

CONFIGS = {"qwen_image": dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                              num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))}
ARCHES = tuple(CONFIGS)

FAMILY = dit.Family(
    transformer_class="QwenImageTransformer2DModel", configs=CONFIGS, to_original=dict,
    text_encoders={"qwen25_7b": "text_encoder"}, pipeline="QwenImagePipeline", vae_prefix="vae.",
    scheduler={"shift": 1.0, "use_dynamic_shifting": True})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
