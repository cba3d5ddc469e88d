"""Tiny Qwen-Image checkpoints from diffusers' `QwenImageTransformer2DModel` (Qwen-Image, and Layered with its
extra timestep embedding and 3-D RoPE) and `QwenImage21Transformer2DModel` (Qwen-Image 2.1).

Qwen-Image's single-file names are diffusers' own (diffusers' single-file mapping for this class is the
identity), so `to_original` keeps them; ComfyUI stores them under `model.diffusion_model.` with the
Qwen2.5-VL text encoder under `text_encoders.qwen25_7b.transformer.`. h 32 = 2 heads × 16, 2 blocks.
Qwen-Image 2.1's ComfyUI names differ from diffusers' by one fused MLP input, `img_mlp.gate_up` (gate rows
first; diffusers' converter splits it back); its text encoder is not written here (the text-encoder
tables' business). The all-in-one files carry no VAE (ckptbend leaves a VAE alone).
"""

from __future__ import annotations

import torch

from . import dit

_QWEN = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
CONFIGS = {"qwen_image": _QWEN,
           "qwen_image_layered": dict(_QWEN, use_additional_t_cond=True, use_layer3d_rope=True),
           "qwen_image_21": dict(patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16,
                                 num_attention_heads=2, context_in_dim=24, axes_dims_rope=(4, 6, 6))}
ARCHES = tuple(CONFIGS)


def fuse_gate_up(state: dict) -> dict:
    """diffusers' Qwen-Image 2.1 MLP (`gate_layer`, `proj`) → ComfyUI's fused `gate_up` (gate rows first)."""
    out = {}
    for key, value in state.items():
        if key.endswith(".img_mlp.proj.weight"):
            continue
        if key.endswith(".img_mlp.gate_layer.weight"):
            key, value = key.replace("gate_layer", "gate_up"), torch.cat([value, state[key.replace("gate_layer", "proj")]])
        out[key] = value
    return out


_FAMILY = dict(text_encoders={"qwen25_7b": "text_encoder"}, vae_prefix="vae.",
               scheduler={"shift": 1.0, "use_dynamic_shifting": True})
FAMILY = dit.Family(transformer_class="QwenImageTransformer2DModel", to_original=dict, pipeline="QwenImagePipeline",
                    configs={a: CONFIGS[a] for a in ("qwen_image", "qwen_image_layered")}, **_FAMILY)
FAMILY_21 = dit.Family(transformer_class="QwenImage21Transformer2DModel", to_original=fuse_gate_up,
                       pipeline="QwenImage21Pipeline", configs={"qwen_image_21": CONFIGS["qwen_image_21"]},
                       **{**_FAMILY, "text_encoders": {}})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    family = FAMILY_21 if arch == "qwen_image_21" else FAMILY
    return dit.write_checkpoint(family, path, arch, layout, size, dtype, seed, shard_size)
