"""Tiny Krea 2 checkpoints from diffusers' `Krea2Transformer2DModel`: h 32 = 2 query heads × 16 with 1 kv head,
2 blocks, a text fusion of one layer-wise and one refiner block.

Original names come from `to_original`, the inverse of diffusers' `convert_krea2_transformer_checkpoint_to_diffusers`
(tests/test_dit_krea2.py runs the converter on it): each block's six modulation vectors flattened into one
`mod.lin`, RMSNorm weights as `.scale`. Text encoder (Qwen3-VL) and VAE are not generated.
"""

from __future__ import annotations

from . import dit

CONFIGS = {"krea2": dict(in_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2, num_key_value_heads=1,
                         intermediate_size=64, timestep_embed_dim=16, text_hidden_dim=24, num_text_layers=3,
                         text_num_attention_heads=2, text_num_key_value_heads=2, text_intermediate_size=32,
                         num_layerwise_text_blocks=1, num_refiner_text_blocks=1, axes_dims_rope=(4, 6, 6))}
ARCHES = tuple(CONFIGS)

# diffusers → original: module prefixes (first match), then block-inner names (each replaced wherever it occurs)
_PREFIXES = {"img_in.": "first.", "time_embed.linear_1.": "tmlp.0.", "time_embed.linear_2.": "tmlp.2.",
             "time_mod_proj.": "tproj.1.", "txt_in.norm.weight": "txtmlp.0.scale", "txt_in.linear_1.": "txtmlp.1.",
             "txt_in.linear_2.": "txtmlp.3.", "text_fusion.": "txtfusion.", "transformer_blocks.": "blocks.",
             "final_layer.linear.": "last.linear.", "final_layer.norm.weight": "last.norm.scale",
             "final_layer.scale_shift_table": "last.modulation.lin"}
_INNER = {".attn.to_q.": ".attn.wq.", ".attn.to_k.": ".attn.wk.", ".attn.to_v.": ".attn.wv.",
          ".attn.to_out.0.": ".attn.wo.", ".attn.to_gate.": ".attn.gate.", ".attn.norm_q.weight": ".attn.qknorm.qnorm.scale",
          ".attn.norm_k.weight": ".attn.qknorm.knorm.scale", ".ff.": ".mlp.", ".norm1.weight": ".prenorm.scale",
          ".norm2.weight": ".postnorm.scale", ".scale_shift_table": ".mod.lin"}


def _name(key: str) -> str:
    for new, old in _PREFIXES.items():
        if key.startswith(new):
            key = old + key[len(new):]
            break
    for new, old in _INNER.items():
        key = key.replace(new, old)
    return key


def to_original(sd: dict) -> dict:
    return {_name(k): v.reshape(-1) if k.startswith("transformer_blocks.") and k.endswith(".scale_shift_table") else v
            for k, v in sd.items()}


FAMILY = dit.Family(transformer_class="Krea2Transformer2DModel", configs=CONFIGS, to_original=to_original,
                    text_encoders={}, pipeline="Krea2Pipeline", vae_prefix="vae.",
                    scheduler={"shift": 3.0, "use_dynamic_shifting": True})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
