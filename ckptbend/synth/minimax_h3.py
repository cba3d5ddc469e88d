"""Tiny MiniMax H3 checkpoints from diffusers' `MiniMaxH3Transformer3DModel`. `to_original` is the inverse of
diffusers' `convert_minimax_h3_transformer_checkpoint_to_diffusers` for the `[q; k; v]` stack of the published single
files (ComfyUI's names: `blocks.N.attn.qkv_proj`, `q_norm`, `out_proj`, `mlp.fc1` = [gate; value], ...); the
recomputed `rope.inv_freq` buffer is not written. Inner width 32 = 2 heads × 16 on a model width of 24 (H3's inner
width differs from its model width too), 2 blocks, 1 refiner block."""

from __future__ import annotations

import torch

from . import dit

CONFIGS = {"minimax_h3": dict(num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2,
                              num_refiner_layers=1, ffn_dim=40, in_channels=4, audio_in_channels=6, text_dim=20,
                              freq_dim=32, time_embed_hidden_dim=24, time_embed_dim=16, rope_freq_dim=2)}
ARCHES = tuple(CONFIGS)
TOP = {"proj_in": "video_patch_proj", "audio_proj_in": "audio_patch_proj", "context_embedder": "condition_proj",
       "norm_out.norm": "final_layer.norm", "norm_out.linear": "final_layer.adaln_proj.linear",
       "proj_out": "final_layer.video_out", "audio_proj_out": "final_layer.audio_out",
       "time_embedder.linear_1": "time_embedder.proj_in", "time_embedder.linear_2": "time_embedder.proj_out"}
INNER = {"attn.norm_q": "attn.q_norm", "attn.norm_k": "attn.k_norm", "attn.to_out.0": "attn.out_proj",
         "ff.net.0.proj": "mlp.fc1", "ff.net.2": "mlp.fc2"}


def _swap(t):
    """[value; gate] (diffusers' SwiGLU) ↔ [gate; value] (the checkpoint's fc1)."""
    a, b = t.chunk(2)
    return torch.cat([b, a])


def to_original(sd: dict) -> dict:
    """diffusers names → the published single file's: top-level renames, then the blocks (`_blocks`)."""
    top = {}
    for key, v in sd.items():
        base, _, suffix = key.rpartition(".")
        top[f"{TOP[base]}.{suffix}" if base in TOP else key] = v
    return _blocks(top)


def _blocks(sd: dict) -> dict:
    """Blocks and refiner blocks: `blocks.N` / `token_refiner.blocks.N`, q | k | v stacked in `qkv_proj`, the
    renamed norms and projections, SwiGLU's fc1 as [gate; value]."""
    out = {}
    for key, v in sd.items():
        key = key.replace("token_refiner.refiner_blocks.", "token_refiner.blocks.")
        if key.startswith("transformer_blocks."):
            key = "blocks." + key.removeprefix("transformer_blocks.")
        if any(f".attn.to_{x}." in key for x in "qkv"):
            if ".attn.to_q." in key:
                out[key.replace(".attn.to_q.", ".attn.qkv_proj.")] = torch.cat(
                    [sd_key(sd, key, x) for x in "qkv"])
            continue
        for a, b in INNER.items():
            key = key.replace(f".{a}.", f".{b}.")
        out[key] = _swap(v) if ".mlp.fc1." in key else v
    return out


def sd_key(sd: dict, renamed: str, x: str):
    """The diffusers tensor of projection `x` for a renamed `….attn.to_q.weight` key."""
    for candidate in (renamed, "transformer_blocks." + renamed.removeprefix("blocks."),
                      renamed.replace("token_refiner.blocks.", "token_refiner.refiner_blocks.")):
        if candidate.replace(".to_q.", f".to_{x}.") in sd:
            return sd[candidate.replace(".to_q.", f".to_{x}.")]
    raise KeyError(renamed)


FAMILY = dit.Family(transformer_class="MiniMaxH3Transformer3DModel", configs=CONFIGS, to_original=to_original,
                    text_encoders={}, pipeline="MiniMaxH3Pipeline", vae_prefix="vae.", scheduler={"shift": 1.0})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
