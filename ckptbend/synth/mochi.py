"""Tiny Mochi checkpoints from diffusers' `MochiTransformer3DModel`: h 16 = 2 heads × 8, text width 16, and the real
48 blocks (diffusers' `convert_mochi_transformer_checkpoint_to_diffusers` counts 48 blocks; at this width the file is
still about 1 MB). `to_original` is that converter's inverse (the tests run it): q | k | v stacked in `attn.qkv_x` /
`qkv_y`, SwiGLU's halves swapped back, the final modulation's (scale, shift) halves swapped back. Text encoder
(T5-XXL) and VAE are not generated."""

from __future__ import annotations

import re

import torch

from . import dit

CONFIGS = {"mochi": dict(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=48,
                         pooled_projection_dim=16, in_channels=4, out_channels=4, text_embed_dim=24, time_embed_dim=16,
                         max_sequence_length=8)}
ARCHES = tuple(CONFIGS)
_TOP = {"patch_embed.proj.": "x_embedder.proj.", "time_embed.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
        "time_embed.timestep_embedder.linear_2.": "t_embedder.mlp.2.", "time_embed.pooler.": "t5_y_embedder.",
        "time_embed.caption_proj.": "t5_yproj.", "norm_out.linear.": "final_layer.mod.",
        "proj_out.": "final_layer.linear."}
_INNER = {"norm1.linear.": "mod_x.", "norm1_context.linear.": "mod_y.", "norm1_context.linear_1.": "mod_y.",
          "attn1.norm_q.": "attn.q_norm_x.", "attn1.norm_k.": "attn.k_norm_x.", "attn1.norm_added_q.": "attn.q_norm_y.",
          "attn1.norm_added_k.": "attn.k_norm_y.", "attn1.to_out.0.": "attn.proj_x.", "attn1.to_add_out.": "attn.proj_y.",
          "ff.net.0.proj.": "mlp_x.w1.", "ff.net.2.": "mlp_x.w2.", "ff_context.net.0.proj.": "mlp_y.w1.",
          "ff_context.net.2.": "mlp_y.w2."}
_QKV = {"attn1.to_q.": ("attn.qkv_x.", "to"), "attn1.add_q_proj.": ("attn.qkv_y.", "add")}
_BLOCK = re.compile(r"^transformer_blocks\.(?P<i>\d+)\.(?P<rest>.*)$")


def _swap(t):
    a, b = t.chunk(2)
    return torch.cat([b, a])


def to_original(sd: dict) -> dict:
    out = {}
    for key, v in sd.items():
        if not (m := _BLOCK.match(key)):
            new = next((old + key[len(n):] for n, old in _TOP.items() if key.startswith(n)), key)
            out[new] = _swap(v) if key.startswith("norm_out.linear.") else v
            continue
        b, rest = f"blocks.{m['i']}.", m["rest"]
        if q := next((q for q in _QKV if rest.startswith(q)), None):
            fused, kind = _QKV[q]
            parts = ("to_q", "to_k", "to_v") if kind == "to" else ("add_q_proj", "add_k_proj", "add_v_proj")
            out[b + fused + "weight"] = torch.cat([sd[f"transformer_blocks.{m['i']}.attn1.{p}.weight"] for p in parts])
        elif not rest.startswith(("attn1.to_k.", "attn1.to_v.", "attn1.add_k_proj.", "attn1.add_v_proj.")):
            new = next((old + rest[len(n):] for n, old in _INNER.items() if rest.startswith(n)), rest)
            out[b + new] = _swap(v) if ".w1." in new else v
    return out


FAMILY = dit.Family(transformer_class="MochiTransformer3DModel", configs=CONFIGS, to_original=to_original,
                    text_encoders={}, pipeline="MochiPipeline", vae_prefix="vae.", scheduler={"shift": 1.0})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
