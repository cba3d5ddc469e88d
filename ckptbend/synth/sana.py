"""Tiny Sana checkpoints from diffusers' `SanaTransformer2DModel`: h 32 = 2 heads × 16, 2 blocks, caption width 24.
`to_original` is the inverse of diffusers' `convert_sana_transformer_to_diffusers` (the tests run the converter on
it): q | k | v stacked in `attn.qkv`, k | v in `cross_attn.kv_linear`; the two tensors the converter drops unread
(`pos_embed`, the null caption `y_embedder.y_embedding`) are written too, as released files hold them. Text encoder
(Gemma 2) and VAE (DC-AE) are not generated."""

from __future__ import annotations

import re

import torch

from . import dit

CONFIGS = {"sana": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                        num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
                        caption_channels=24, mlp_ratio=2.0, sample_size=8, patch_size=1)}
ARCHES = tuple(CONFIGS)
_TOP = {"patch_embed.proj.": "x_embedder.proj.", "time_embed.emb.timestep_embedder.linear_1.": "t_embedder.mlp.0.",
        "time_embed.emb.timestep_embedder.linear_2.": "t_embedder.mlp.2.", "time_embed.linear.": "t_block.1.",
        "caption_projection.linear_1.": "y_embedder.y_proj.fc1.", "caption_projection.linear_2.": "y_embedder.y_proj.fc2.",
        "caption_norm.": "attention_y_norm.", "proj_out.": "final_layer.linear.",
        "scale_shift_table": "final_layer.scale_shift_table"}
_INNER = {"attn1.to_out.0.": "attn.proj.", "attn2.to_q.": "cross_attn.q_linear.", "attn2.to_out.0.": "cross_attn.proj.",
          "ff.conv_inverted.": "mlp.inverted_conv.conv.", "ff.conv_depth.": "mlp.depth_conv.conv.",
          "ff.conv_point.": "mlp.point_conv.conv.", "scale_shift_table": "scale_shift_table"}
_BLOCK = re.compile(r"^transformer_blocks\.(?P<i>\d+)\.(?P<rest>.*)$")


def to_original(sd: dict) -> dict:
    out = {"pos_embed": torch.zeros(1, 64, 32), "y_embedder.y_embedding": torch.zeros(4, 24)}
    for key, v in sd.items():
        if not (m := _BLOCK.match(key)):
            out[next((old + key[len(new):] for new, old in _TOP.items() if key.startswith(new)), key)] = v
            continue
        b, rest = f"blocks.{m['i']}.", m["rest"]
        if rest.startswith(("attn1.to_k.", "attn1.to_v.", "attn2.to_v.")):
            continue                                  # joined with their q (self) or k (cross) below
        if rest.startswith("attn1.to_q."):
            out[b + "attn.qkv." + rest.rsplit(".", 1)[1]] = torch.cat(
                [sd[key.replace(".to_q.", f".to_{x}.")] for x in "qkv"])
        elif rest.startswith("attn2.to_k."):
            out[b + "cross_attn.kv_linear." + rest.rsplit(".", 1)[1]] = torch.cat([v, sd[key.replace(".to_k.", ".to_v.")]])
        else:
            out[b + next((old + rest[len(new):] for new, old in _INNER.items() if rest.startswith(new)), rest)] = v
    return out


FAMILY = dit.Family(transformer_class="SanaTransformer2DModel", configs=CONFIGS, to_original=to_original,
                    text_encoders={}, pipeline="SanaPipeline", vae_prefix="vae.", scheduler={"shift": 3.0})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
