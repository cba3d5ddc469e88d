"""Tiny AuraFlow checkpoints from diffusers' `AuraFlowTransformer2DModel`: h 32 = 2 heads × 16, 2 double and 2 single
layers. `to_original` is the inverse of diffusers' `convert_auraflow_transformer_checkpoint_to_diffusers` (the tests run
the converter on it). Text encoder (Pile-T5-XL) and VAE are not generated."""

from __future__ import annotations

import re

import torch

from . import dit

CONFIGS = {"auraflow": dict(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=2, num_single_dit_layers=2,
                            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                            caption_projection_dim=32, out_channels=4, pos_embed_max_size=8)}
ARCHES = tuple(CONFIGS)
_TOP = {"time_step_proj.linear_1.": "t_embedder.mlp.0.", "time_step_proj.linear_2.": "t_embedder.mlp.2.",
        "context_embedder.": "cond_seq_linear.", "proj_out.": "final_linear.", "norm_out.linear.": "modF.1.",
        "pos_embed.pos_embed": "positional_encoding", "pos_embed.proj.": "init_x_linear."}
_DOUBLE = {"ff.": "mlpX.", "ff_context.": "mlpC.", "norm1.linear.": "modX.1.", "norm1_context.linear.": "modC.1.",
           "attn.to_q.": "attn.w2q.", "attn.to_k.": "attn.w2k.", "attn.to_v.": "attn.w2v.", "attn.to_out.0.": "attn.w2o.",
           "attn.add_q_proj.": "attn.w1q.", "attn.add_k_proj.": "attn.w1k.", "attn.add_v_proj.": "attn.w1v.",
           "attn.to_add_out.": "attn.w1o."}
_SINGLE = {"ff.": "mlp.", "norm1.linear.": "modCX.1.", "attn.to_q.": "attn.w1q.", "attn.to_k.": "attn.w1k.",
           "attn.to_v.": "attn.w1v.", "attn.to_out.0.": "attn.w1o."}
_FF = {"linear_1": "c_fc1", "linear_2": "c_fc2", "out_projection": "c_proj"}
_BLOCK = re.compile(r"^(?P<kind>joint_transformer_blocks|single_transformer_blocks)\.(?P<i>\d+)\.(?P<rest>.*)$")


def _name(key: str) -> str:
    if m := _BLOCK.match(key):
        double = m["kind"] == "joint_transformer_blocks"
        rest = m["rest"]
        for new, old in (_DOUBLE if double else _SINGLE).items():
            if rest.startswith(new):
                rest = old + rest[len(new):]
                break
        for new, old in _FF.items():
            rest = re.sub(rf"^(mlp[XC]?)\.{new}\.", rf"\1.{old}.", rest)
        return f"{'double_layers' if double else 'single_layers'}.{m['i']}.{rest}"
    return next((old + key[len(new):] for new, old in _TOP.items() if key.startswith(new)), key)


def to_original(sd: dict) -> dict:
    out = {}
    for key, v in sd.items():
        if key == "norm_out.linear.weight":           # diffusers swaps the final modulation's (shift, scale) halves
            v = torch.cat(v.chunk(2)[::-1])
        out[_name(key)] = v
    return out


FAMILY = dit.Family(transformer_class="AuraFlowTransformer2DModel", configs=CONFIGS, to_original=to_original,
                    text_encoders={}, pipeline="AuraFlowPipeline", vae_prefix="vae.", scheduler={"shift": 1.73})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
