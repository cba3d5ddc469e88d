"""Tiny Flux.3 klein checkpoints from diffusers' `Flux3Transformer2DModel`: ``flux3_klein`` (step-distilled: a
flow map with its second timestep embedder) and ``flux3_klein_base``; h 32 = 2 heads × 16, 2 per-mode blocks
per mode (image, reference, text) and 2 joint single blocks.

Original (BFL) names come from `to_original`, the inverse of diffusers'
`convert_flux3_transformer_checkpoint_to_diffusers` (tests/test_dit_flux3.py runs the converter on it). diffusers
has no Flux.3 pipeline, so there is no pipeline-folder layout here (a folder with a `transformer/` sub-folder
is read by its config: tests/test_dit_flux3.py); text encoder (Qwen3-VL) and VAE are not generated.
"""

from __future__ import annotations

from ..errors import CkptbendError
from . import dit
from .flux_names import swap_halves

_TINY = dict(in_channels=8, cond_in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=24, timestep_channels=16, axes_dims_rope=(4, 4, 4, 4))
CONFIGS = {"flux3_klein": {**_TINY, "flow_map": True}, "flux3_klein_base": {**_TINY, "flow_map": False}}
ARCHES = tuple(CONFIGS)

# diffusers → BFL: whole keys, module prefixes, block-inner suffixes (the converter's three tables, inverted)
_KEYS = {"timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
         "timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
         "target_timestep_embedder.linear_1.weight": "ref_time_in.in_layer.weight",
         "target_timestep_embedder.linear_2.weight": "ref_time_in.out_layer.weight",
         "proj_out.weight": "final_layer.image.linear.weight"}
_PREFIXES = {"x_embedders.": "emb_in.", "context_embedder.": "txt_in.", "mode_blocks.": "content_mode_blocks.",
             "single_transformer_blocks.": "single_blocks."}
_INNER = {"attn.to_q.weight": "q_proj.weight", "attn.to_k.weight": "k_proj.weight", "attn.to_v.weight": "v_proj.weight",
          "attn.to_out.0.weight": "attn_out.weight", "attn.norm_q.weight": "norm.query_norm.scale",
          "attn.norm_k.weight": "norm.key_norm.scale", "ff.linear_in.weight": "mlp_in.weight",
          "ff.linear_out.weight": "mlp_out.weight"}


def _name(key: str) -> str:
    if key in _KEYS:
        return _KEYS[key]
    for new, old in _PREFIXES.items():
        if key.startswith(new):
            key = old + key[len(new):]
            break
    key = key.replace(".linear.weight", ".lin.weight")
    return next((key[:-len(s)] + o for s, o in _INNER.items() if key.endswith(s)), key)


def to_original(sd: dict) -> dict:
    """diffusers state dict → BFL names (no prefix); the final adaLN's scale | shift back to shift | scale."""
    out = {_name(k): v for k, v in sd.items() if k != "norm_out.linear.weight"}
    out["final_layer.image.adaLN_modulation.1.weight"] = swap_halves(sd["norm_out.linear.weight"])
    return out


FAMILY = dit.Family(transformer_class="Flux3Transformer2DModel", configs=CONFIGS, to_original=to_original,
                    text_encoders={}, pipeline="", vae_prefix="vae.")


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    if layout == "diffusers":
        raise CkptbendError("synth: diffusers has no Flux.3 pipeline; use transformer_diffusers (or single, comfy)")
    return dit.write_checkpoint(FAMILY, path, arch, layout, size, dtype, seed, shard_size)
