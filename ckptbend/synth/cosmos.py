"""Tiny Cosmos Predict2 checkpoints from diffusers' `CosmosTransformer3DModel`: h 32 = 2 heads × 16, 2 blocks, text
width 24, no learnable position embedding (Predict2's `extra_pos_embedder` is not converted by diffusers' Cosmos 2.0
table) and no padding-mask channel (diffusers resizes that mask with torchvision; the channel only widens
`x_embedder`). `to_original` is the inverse of diffusers' `convert_cosmos_transformer_checkpoint_to_diffusers`
(Cosmos 2.0 names, written bare: NVIDIA's file puts them under `net.`, which the converter strips). Text encoder and
VAE are not generated. Anima (synth/anima.py) adds its text adapter to this transformer."""

from __future__ import annotations

from . import dit

CONFIGS = {"cosmos_predict2": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
                                   num_layers=2, mlp_ratio=2.0, text_embed_dim=24, adaln_lora_dim=8, max_size=(4, 16, 16),
                                   patch_size=(1, 2, 2), extra_pos_embed_type=None,
                                   concat_padding_mask=False)}
ARCHES = tuple(CONFIGS)
# diffusers → original, each replaced wherever it occurs, in this order
_NAMES = (("transformer_blocks.", "blocks."), (".attn1.", ".self_attn."), (".attn2.", ".cross_attn."),
          (".to_q.", ".q_proj."), (".to_k.", ".k_proj."), (".to_v.", ".v_proj."), (".to_out.0.", ".output_proj."),
          (".norm_q.", ".q_norm."), (".norm_k.", ".k_norm."), (".norm1.linear_", ".adaln_modulation_self_attn."),
          (".norm2.linear_", ".adaln_modulation_cross_attn."), (".norm3.linear_", ".adaln_modulation_mlp."),
          (".ff.net.0.proj.", ".mlp.layer1."), (".ff.net.2.", ".mlp.layer2."),
          ("patch_embed.proj.", "x_embedder.proj.1."), ("time_embed.t_embedder.", "t_embedder.1."),
          ("time_embed.norm.", "t_embedding_norm."), ("norm_out.linear_", "final_layer.adaln_modulation."),
          ("proj_out.", "final_layer.linear."))


def _name(key: str) -> str:
    for new, old in _NAMES:
        key = key.replace(new, old)
    return key


def to_original(sd: dict) -> dict:
    return {_name(k): v for k, v in sd.items()}


FAMILY = dit.Family(transformer_class="CosmosTransformer3DModel", configs=CONFIGS, to_original=to_original,
                    text_encoders={}, pipeline="Cosmos2TextToImagePipeline", vae_prefix="vae.", scheduler={"shift": 1.0})


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
