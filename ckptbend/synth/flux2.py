"""Tiny Flux.2 checkpoints from diffusers' `Flux2Transformer2DModel`: ``flux2_dev`` (with the guidance embedder)
and ``flux2_klein`` (without; klein 4B / 9B and base / distilled differ only in size and weights), h 32 =
2 heads × 16, 2 double + 2 single blocks, in every layout of synth/dit.py.

Original (BFL / ComfyUI) names come from `to_original`, the inverse of diffusers'
`convert_flux2_transformer_checkpoint_to_diffusers` (tests/test_dit_flux2.py runs the converter on it): the
double blocks' q, k, v joined into `qkv` (q | k | v), the single blocks' `to_qkv_mlp_proj` / `to_out` named
`linear1` / `linear2` unchanged, qk-norm weights as `.scale`, the final adaLN's shift | scale halves swapped.
Text encoders (Mistral Small 3 / Qwen3) and the VAE are not generated: the all-in-one file holds the model.
"""

from __future__ import annotations

import torch

from . import dit
from .flux_names import swap_halves

_TINY = dict(in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
             joint_attention_dim=24, timestep_guidance_channels=16, axes_dims_rope=(4, 4, 4, 4))
CONFIGS = {"flux2_dev": {**_TINY, "guidance_embeds": True}, "flux2_klein": {**_TINY, "guidance_embeds": False}}
ARCHES = tuple(CONFIGS)
# Released transformer configs (meta-device builds for the full-size layout tests).
FULL = {"flux2-dev": {},
        "flux2-klein-4b": dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                               guidance_embeds=False),
        "flux2-klein-9b": dict(num_layers=8, num_single_layers=24, num_attention_heads=32, joint_attention_dim=12288,
                               guidance_embeds=False)}

_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
        "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        **{f"{m}.linear": f"{m}.lin" for m in ("double_stream_modulation_img", "double_stream_modulation_txt",
                                               "single_stream_modulation")}}
_DOUBLE = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
           "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm",
           "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
           "ff.linear_in": "img_mlp.0", "ff.linear_out": "img_mlp.2",
           "ff_context.linear_in": "txt_mlp.0", "ff_context.linear_out": "txt_mlp.2"}
_SINGLE = {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2",
           "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_QKV = {"attn.to_": "img_attn.qkv", "attn.add_": "txt_attn.qkv"}   # to_q|to_k|to_v, add_q_proj|add_k_proj|add_v_proj


def _name(module: str, param: str) -> str:
    return f"{module}.{'scale' if module.endswith('_norm') else param}"


def to_original(sd: dict) -> dict:
    """diffusers state dict → BFL names (no prefix)."""
    out = {}
    for k, v in sd.items():
        base, _, param = k.rpartition(".")
        if base in _TOP:
            out[f"{_TOP[base]}.{param}"] = v
        elif base == "norm_out.linear":
            out[f"final_layer.adaLN_modulation.1.{param}"] = swap_halves(v)
        elif base.startswith("transformer_blocks."):
            _, i, inner = base.split(".", 2)
            if inner in _DOUBLE:
                out[_name(f"double_blocks.{i}.{_DOUBLE[inner]}", param)] = v
        elif base.startswith("single_transformer_blocks."):
            _, i, inner = base.split(".", 2)
            out[_name(f"single_blocks.{i}.{_SINGLE[inner]}", param)] = v
    for i in sorted({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")}, key=int):
        for start, fused in _QKV.items():
            names = [f"transformer_blocks.{i}.{start}{x}" + ("" if start == "attn.to_" else "_proj") for x in "qkv"]
            for param in ("weight", "bias"):
                if f"{names[0]}.{param}" in sd:
                    out[f"double_blocks.{i}.{fused}.{param}"] = torch.cat([sd[f"{n}.{param}"] for n in names])
    return out


FAMILIES = {arch: dit.Family(transformer_class="Flux2Transformer2DModel", configs={arch: config},
                             to_original=to_original, text_encoders={}, vae_prefix="vae.",
                             pipeline="Flux2Pipeline" if arch == "flux2_dev" else "Flux2KleinPipeline",
                             scheduler={"shift": 3.0, "use_dynamic_shifting": True})
            for arch, config in CONFIGS.items()}


def build_full(name: str):
    """A released Flux.2 transformer (`FULL`) on the meta device: its shapes, no memory."""
    import diffusers

    with torch.device("meta"):
        return diffusers.Flux2Transformer2DModel(**FULL[name])


# (arch, size) → released config, for full-size files (BFL names, the `single` layout; values drawn while writing)
FULL_SIZES = {("flux2_dev", "full"): "flux2-dev", ("flux2_klein", "full"): "flux2-klein-9b",
              ("flux2_klein", "4b"): "flux2-klein-4b"}


def write_checkpoint(path, arch, layout="single", size="tiny", dtype=None, seed=0, shard_size=None):
    if (arch, size) in FULL_SIZES:
        import numpy as np

        from ..errors import CkptbendError
        from .files import write_safetensors
        if layout != "single" or shard_size is not None or dtype in dit.QUANTISED:
            raise CkptbendError(f"synth: {arch} at size {size!r} is written in the single layout, plain dtypes only")
        state = to_original(build_full(FULL_SIZES[arch, size]).state_dict())
        return write_safetensors(path, state, dtype or torch.bfloat16, np.random.default_rng(seed))
    family = FAMILIES.get(arch, FAMILIES["flux2_klein"])   # an unknown arch: dit.write_checkpoint names it
    return dit.write_checkpoint(family, path, arch, layout, size, dtype, seed, shard_size)
