"""Tiny SD3-medium, SD3.5-medium and SD3.5-large checkpoints from diffusers' `SD3Transformer2DModel`.

`to_original` is the inverse of diffusers' `convert_sd3_transformer_checkpoint_to_diffusers` (SAI / ComfyUI
names: fused `attn.qkv` = q | k | v rows, `ln_q`/`ln_k`, the pre-only last `context_block` with no `proj`
and its adaLN stored shift | scale); tests/test_dit_sd3.py runs diffusers' converter on it and loads the
result strict. The widths follow the real rule h = 64 × depth only in spirit: h 32 = 2 heads × 16, 3 blocks,
SD3.5-medium's attn2 in blocks 0–1 (the last block has none, as in the real model). Tiny files therefore
sniff as "v1" in diffusers' `infer_diffusers_model_type`, which needs the real `pos_embed` lengths.
"""

from __future__ import annotations

import torch

from . import dit

_BASE = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=20, out_channels=4,
             pos_embed_max_size=8)
CONFIGS = {
    "sd3_medium": {**_BASE, "dual_attention_layers": (), "qk_norm": None},
    "sd35_medium": {**_BASE, "dual_attention_layers": (0, 1), "qk_norm": "rms_norm"},
    "sd35_large": {**_BASE, "dual_attention_layers": (), "qk_norm": "rms_norm"},
}
ARCHES = tuple(CONFIGS)

_RENAMES = {
    "pos_embed.proj": "x_embedder.proj",
    "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
    "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2",
    "context_embedder": "context_embedder", "proj_out": "final_layer.linear",
}
# per block: diffusers module → original module, for the parts that are plain renames
_X_BLOCK = {"attn.to_out.0": "attn.proj", "norm1.linear": "adaLN_modulation.1", "ff.net.0.proj": "mlp.fc1",
            "ff.net.2": "mlp.fc2", "attn2.to_out.0": "attn2.proj"}
_CONTEXT_BLOCK = {"attn.to_add_out": "attn.proj", "norm1_context.linear": "adaLN_modulation.1",
                  "ff_context.net.0.proj": "mlp.fc1", "ff_context.net.2": "mlp.fc2"}
_NORMS = {"attn.norm_q": "x_block.attn.ln_q", "attn.norm_k": "x_block.attn.ln_k",
          "attn.norm_added_q": "context_block.attn.ln_q", "attn.norm_added_k": "context_block.attn.ln_k",
          "attn2.norm_q": "x_block.attn2.ln_q", "attn2.norm_k": "x_block.attn2.ln_k"}
_FUSED = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
          "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
          "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}


def swap_halves(t):
    """shift | scale ↔ scale | shift along the rows (diffusers swaps the final / pre-only adaLN)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def to_original(sd: dict) -> dict:
    """diffusers state dict → SAI / ComfyUI original names (bare)."""
    out = {}
    for k, v in sd.items():
        base, _, suffix = k.rpartition(".")
        if base in _RENAMES:
            out[f"{_RENAMES[base]}.{suffix}"] = v
    out["pos_embed"] = sd["pos_embed.pos_embed"]
    for wb in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{wb}"] = swap_halves(sd[f"norm_out.linear.{wb}"])
    n = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("transformer_blocks."))
    for i in range(n):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        pre_only = f"{d}attn.to_add_out.weight" not in sd
        for wb in ("weight", "bias"):
            for fused, parts in _FUSED.items():
                if f"{d}{parts[0]}.{wb}" in sd:
                    out[f"{o}{fused}.{wb}"] = torch.cat([sd[f"{d}{p}.{wb}"] for p in parts])
            for table, part in ((_X_BLOCK, "x_block"), (_CONTEXT_BLOCK, "context_block")):
                for src, dst in table.items():
                    if f"{d}{src}.{wb}" in sd:
                        out[f"{o}{part}.{dst}.{wb}"] = sd[f"{d}{src}.{wb}"]
            if pre_only:   # the last context block: adaLN [2h, h], stored shift | scale
                out[f"{o}context_block.adaLN_modulation.1.{wb}"] = swap_halves(sd[f"{d}norm1_context.linear.{wb}"])
        for src, dst in _NORMS.items():
            if f"{d}{src}.weight" in sd:
                out[f"{o}{dst}.weight"] = sd[f"{d}{src}.weight"]
    return out


def _vae(seed):
    """SD3's 16-channel VAE, tiny; original names under first_stage_model. in the all-in-one file."""
    from diffusers import AutoencoderKL

    from .sd_names import vae_to_ldm
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 5)
        vae = AutoencoderKL(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2, latent_channels=16,
                            sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False,
                            use_post_quant_conv=False).eval()
    return vae, vae_to_ldm(vae.state_dict(), vae.config)


FAMILY = dit.Family(
    transformer_class="SD3Transformer2DModel", configs=CONFIGS, to_original=to_original,
    text_encoders={"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5xxl": "text_encoder_3"},
    pipeline="StableDiffusion3Pipeline", vae_prefix="first_stage_model.", vae=_vae,
    scheduler={"shift": 3.0})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
