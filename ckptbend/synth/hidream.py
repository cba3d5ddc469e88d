"""Tiny HiDream-I1 checkpoints from diffusers' `HiDreamImageTransformer2DModel`.

Its single-file names are diffusers' own (diffusers' converter only strips `model.diffusion_model.`), so
`to_original` keeps them. h 32 = 2 heads × 16, 2 double-stream and 2 single-stream blocks, a mixture of two
experts (one active) in each feed-forward. ComfyUI's all-in-one file carries its four text encoders, CLIP-L,
CLIP-G, T5-XXL and Llama 3.1, under `text_encoders.`; no VAE (ckptbend leaves a VAE alone).
"""

from __future__ import annotations

from . import dit

CONFIGS = {"hidream": dict(patch_size=2, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
                           num_attention_heads=2, caption_channels=[24, 16], text_emb_dim=20, num_routed_experts=2,
                           num_activated_experts=1, axes_dims_rope=(8, 4, 4), max_resolution=(16, 16),
                           llama_layers=[0, 1, 2, 3])}
ARCHES = tuple(CONFIGS)

FAMILY = dit.Family(
    transformer_class="HiDreamImageTransformer2DModel", configs=CONFIGS, to_original=dict,
    text_encoders={"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3", "llama": "text_encoder_4"},
    pipeline="HiDreamImagePipeline", vae_prefix="vae.", scheduler={"shift": 3.0, "use_dynamic_shifting": False})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
