"""Tiny LongCat-Image and Ovis-Image checkpoints from diffusers' `LongCatImageTransformer2DModel` and
`OvisImageTransformer2DModel`: h 32 = 2 heads × 16, 2 double + 2 single blocks, in every layout of synth/dit.py.

diffusers has no single-file converter for either, so the original names are ComfyUI's, which runs both as
its Flux class (comfy/model_detection.py: LongCat-Image is Flux without `vector_in` or `guidance_in`; Ovis-Image
sets `yak_mlp` and `txt_norm`): Flux.1's BFL names (synth/flux_names.py), plus for Ovis-Image
- the double blocks' SwiGLU MLP as `img_mlp.up_proj` / `gate_proj` / `down_proj` (diffusers' `ff.net.0.proj`
  holds value | gate rows, `ff.net.2` the down projection), the same for `txt_mlp`;
- the single blocks' `linear1` = q | k | v | `proj_mlp` (value | gate: ComfyUI applies the activation to the
  second half, as diffusers does to its gate half);
- `context_embedder_norm` as `txt_norm.scale`.
Text encoders and the VAE are not generated; tiny only (the classes' default configs are not the released
sizes: LongCat-Image's defaults make 11.9B parameters where the release is 6B).
"""

from __future__ import annotations

from . import dit
from .flux_names import flux_to_original

_TINY = dict(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
CONFIGS = {"longcat_image": {**_TINY, "pooled_projection_dim": 24}, "ovis_image": {**_TINY, "out_channels": 8}}
ARCHES = tuple(CONFIGS)
# diffusers top-level names → the Flux.1 diffusers names flux_to_original knows
_TOP = {"longcat_image": {"time_embed.timestep_embedder.": "time_text_embed.timestep_embedder."},
        "ovis_image": {"timestep_embedder.": "time_text_embed.timestep_embedder."}}
_SWIGLU = {".0.": ("up_proj", "gate_proj"), ".2.": ("down_proj",)}   # img_mlp.N. → YakMLP names


def _renamed(sd: dict, renames: dict) -> dict:
    return {next((new + k[len(old):] for old, new in renames.items() if k.startswith(old)), k): v for k, v in sd.items()}


def _yak_mlp(original: dict) -> dict:
    """Flux's `img_mlp.0` / `.2` (and `txt_mlp`) → ComfyUI's YakMLP names, the fused rows split value | gate."""
    out = {}
    for k, v in original.items():
        mark = next((m for m in _SWIGLU if k.startswith("double_blocks.") and f"_mlp{m}" in k), None)
        if mark is None:
            out[k] = v
            continue
        names = _SWIGLU[mark]
        for name, part in zip(names, v.chunk(len(names), dim=0)):
            out[k.replace(f"_mlp{mark}", f"_mlp.{name}.")] = part.contiguous()
    return out


def longcat_to_original(sd: dict) -> dict:
    return flux_to_original(_renamed(sd, _TOP["longcat_image"]))


def ovis_to_original(sd: dict) -> dict:
    out = _yak_mlp(flux_to_original(_renamed(sd, _TOP["ovis_image"])))
    out["txt_norm.scale"] = sd["context_embedder_norm.weight"]
    return out


FAMILIES = {
    "longcat_image": dit.Family(transformer_class="LongCatImageTransformer2DModel",
                                configs={"longcat_image": CONFIGS["longcat_image"]}, to_original=longcat_to_original,
                                text_encoders={}, pipeline="LongCatImagePipeline", vae_prefix="vae."),
    "ovis_image": dit.Family(transformer_class="OvisImageTransformer2DModel",
                             configs={"ovis_image": CONFIGS["ovis_image"]}, to_original=ovis_to_original,
                             text_encoders={}, pipeline="OvisImagePipeline", vae_prefix="vae."),
}


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    family = FAMILIES.get(arch, FAMILIES["longcat_image"])   # an unknown arch: dit.write_checkpoint names it
    return dit.write_checkpoint(family, path, arch, layout, size, dtype, seed, shard_size)
