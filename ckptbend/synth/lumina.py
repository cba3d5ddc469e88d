"""Tiny Z-Image and Lumina 2 checkpoints from diffusers' `ZImageTransformer2DModel` and
`Lumina2Transformer2DModel` (the NextDiT backbone).

`to_original` inverts diffusers' single-file converters (`convert_z_image_transformer_checkpoint_to_diffusers`,
`convert_lumina2_to_diffusers`; the tests run them on the result): to_q | to_k | to_v fused into
`attention.qkv`, `to_out.0` → `out`, `norm_q/k` → `q_norm/k_norm`, and Lumina 2's other renamings.
Z-Image: h 64 = 4 heads × 16, 2 refiner blocks of each kind and 2 main layers; Lumina 2 the same with 2
kv heads (grouped k and v, as the real 24 / 8). The all-in-one file and the folder carry the tiny text encoder
(Qwen3-4B for Z-Image, Gemma-2-2B for Lumina 2; the text-encoder tables find their attention), no VAE
(ckptbend leaves a VAE alone).
"""

from __future__ import annotations

import re

import torch

from . import dit

_ROPE = dict(axes_lens=(64, 16, 16))   # caption positions run to 32 (padded), then the image
CONFIGS = {
    "z_image": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=2, n_refiner_layers=2,
                    n_heads=4, n_kv_heads=4, cap_feat_dim=24, axes_dims=[4, 6, 6], **_ROPE),
    "lumina2": dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=64, num_layers=2, num_refiner_layers=2,
                    num_attention_heads=4, num_kv_heads=2, multiple_of=16, axes_dim_rope=(4, 6, 6),
                    cap_feat_dim=24, **_ROPE),
}
ARCHES = tuple(CONFIGS)
# Z-Image (base and turbo) as released: 30 + 2 + 2 blocks of 3840 = 30 heads × 128, Qwen3-4B's 2560-wide features
# (diffusers' defaults; ComfyUI's axes_lens, which hold no parameters): 6.15 B parameters.
FULL = {"z_image": dict(axes_lens=[1536, 512, 512])}

_QKV = re.compile(r"^(?P<block>.+\.(?:attention|attn))\.to_q\.weight$")

# diffusers name → original name, first match wins per pattern, applied in order (the converters' maps reversed).
_ZIMAGE = ((r"^all_final_layer\.2-1\.", "final_layer."), (r"^all_x_embedder\.2-1\.", "x_embedder."),
           (r"\.attention\.to_out\.0\.", ".attention.out."), (r"\.attention\.norm_q\.", ".attention.q_norm."),
           (r"\.attention\.norm_k\.", ".attention.k_norm."))
_LUMINA2 = ((r"^time_caption_embed\.caption_embedder\.", "cap_embedder."),
            (r"^time_caption_embed\.timestep_embedder\.linear_1\.", "t_embedder.mlp.0."),
            (r"^time_caption_embed\.timestep_embedder\.linear_2\.", "t_embedder.mlp.2."),
            (r"^norm_out\.linear_1\.", "final_layer.adaLN_modulation.1."), (r"^norm_out\.linear_2\.", "final_layer.linear."),
            (r"\.attn\.to_out\.0\.", ".attention.out."), (r"\.attn\.norm_q\.", ".attention.q_norm."),
            (r"\.attn\.norm_k\.", ".attention.k_norm."), (r"\.attn\.", ".attention."),
            (r"\.feed_forward\.linear_(\d)\.", r".feed_forward.w\1."), (r"\.norm1\.linear\.", ".adaLN_modulation.1."),
            (r"\.norm1\.norm\.", ".attention_norm1."), (r"\.norm1\.", ".attention_norm1."), (r"\.norm2\.", ".attention_norm2."))


def _original(renames):
    def to_original(state: dict) -> dict:
        out = {}
        for key, value in state.items():
            if key.endswith((".to_k.weight", ".to_v.weight")):
                continue   # fused with to_q below
            if m := _QKV.match(key):
                b = m["block"]
                value = torch.cat([state[f"{b}.to_q.weight"], state[f"{b}.to_k.weight"], state[f"{b}.to_v.weight"]])
                key = f"{b}.qkv.weight"
            for pattern, new in renames:
                key = re.sub(pattern, new, key)
            out[key] = value
        return out
    return to_original


def _family(cls: str, arch: str, renames, pipeline: str, encoder: str) -> dit.Family:
    return dit.Family(transformer_class=cls, configs={arch: CONFIGS[arch]}, to_original=_original(renames),
                      full_configs={a: c for a, c in FULL.items() if a == arch},
                      text_encoders={encoder: "text_encoder"}, pipeline=pipeline, vae_prefix="vae.",
                      scheduler={"shift": 3.0, "use_dynamic_shifting": False})


FAMILIES = {"z_image": _family("ZImageTransformer2DModel", "z_image", _ZIMAGE, "ZImagePipeline", "qwen3_4b"),
            "lumina2": _family("Lumina2Transformer2DModel", "lumina2", _LUMINA2, "Lumina2Pipeline", "gemma2_2b")}


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILIES.get(arch, FAMILIES["z_image"]), path, arch, layout, size, dtype, seed,
                                shard_size)
