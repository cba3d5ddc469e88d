"""Tiny LTX-2 / 2.3 / 2.5 checkpoints from diffusers' `LTX2VideoTransformer3DModel` (video and audio streams).

`to_original` gives Lightricks' / ComfyUI's names: the inverse of diffusers' `convert_ltx2_transformer_to_diffusers`
plus `prompt_adaln_single` / `audio_prompt_adaln_single` (LTX-2.3's prompt modulation, ComfyUI's `LTXAVModel`
names), which that converter in diffusers 0.42.1 does not rename (tests/test_dit_ltx2.py shows it). Video 32 =
2 heads × 16, audio 16 = 2 × 8 (the qk-norms span all heads), 2 blocks. No text encoder (Gemma 3) or VAE.
"""

from __future__ import annotations

from . import dit

_BASE = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
             audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=8,
             audio_cross_attention_dim=16, num_layers=2, caption_channels=24)
# LTX-2.3: per-head gates and prompt modulation, text features projected in the connector (no caption_projection);
# LTX-2.5: a static prompt table (no prompt_adaln), no video feed-forward biases, the keyframe embedding.
_22B = dict(gated_attn=True, audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True,
            use_prompt_embeddings=False)
CONFIGS = {"ltx2": _BASE, "ltx2_3": {**_BASE, **_22B},
           "ltx2_5": {**_BASE, **_22B, "ff_bias": False, "use_prompt_adaln_single": False,
                      "use_keyframes_abs_pos_embedding": True}}
ARCHES = tuple(CONFIGS)

# diffusers → original: top-level modules, then names inside a block.
TOP = {"proj_in": "patchify_proj", "audio_proj_in": "audio_patchify_proj", "time_embed": "adaln_single",
       "audio_time_embed": "audio_adaln_single", "prompt_adaln": "prompt_adaln_single",
       "audio_prompt_adaln": "audio_prompt_adaln_single",
       "av_cross_attn_video_scale_shift": "av_ca_video_scale_shift_adaln_single",
       "av_cross_attn_audio_scale_shift": "av_ca_audio_scale_shift_adaln_single",
       "av_cross_attn_video_a2v_gate": "av_ca_a2v_gate_adaln_single",
       "av_cross_attn_audio_v2a_gate": "av_ca_v2a_gate_adaln_single"}
BLOCK = {"video_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_video",
         "audio_a2v_cross_attn_scale_shift_table": "scale_shift_table_a2v_ca_audio",
         "norm_q": "q_norm", "norm_k": "k_norm"}


def original_name(key: str) -> str:
    parts = key.split(".")
    parts[0] = TOP.get(parts[0], parts[0])
    return ".".join(BLOCK.get(p, p) for p in parts) if parts[0] == "transformer_blocks" else ".".join(parts)


def to_original(state: dict) -> dict:
    return {original_name(k): v for k, v in state.items()}


FAMILY = dit.Family(transformer_class="LTX2VideoTransformer3DModel", configs=CONFIGS, to_original=to_original,
                    text_encoders={}, pipeline="LTX2Pipeline", vae_prefix="vae.", scheduler={"shift": 1.0})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
