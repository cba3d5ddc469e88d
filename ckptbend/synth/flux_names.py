"""diffusers → original names for Flux.1, Chroma (BFL names) and HunyuanVideo (Tencent names, and the
Flux-style names ComfyUI saves it with): the inverse of diffusers' single-file converters
(`convert_flux_transformer_checkpoint_to_diffusers`, `convert_chroma_…`, `convert_hunyuan_video_…`),
which tests/test_dit_flux.py runs on the result. Fused tensors are concatenated in the converters' order:
qkv = q | k | v, single-block linear1 = q | k | v | MLP-in."""

from __future__ import annotations

import re

import torch


def swap_halves(t):
    """shift | scale ↔ scale | shift along dim 0 (final-layer adaLN: the converters swap it)."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _cat(sd, keys):
    return torch.cat([sd[k] for k in keys])


def _count(sd, start):
    return 1 + max((int(k.split(".")[1]) for k in sd if k.startswith(start)), default=-1)


_FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}
# diffusers block module → BFL name, per double block (stream-qualified) and single block
_FLUX_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
                "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_FLUX_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                      "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
# How one naming spells the double and single blocks: the fused qkv per stream, the renamed Linears,
# the qk-norms (and the suffix their weight takes), single-block Linears and norms. Modules a model lacks
# (Chroma has no per-block modulation) are skipped.
FLUX_BLOCKS = {"qkv": ("img_attn.qkv", "txt_attn.qkv"), "double": _FLUX_DOUBLE, "double_norms": _FLUX_DOUBLE_NORMS,
               "norm_suffix": "scale", "single": {"norm.linear": "modulation.lin", "proj_out": "linear2"},
               "single_norms": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}}


def _blocks(sd: dict, names: dict) -> dict:
    """The double and single blocks of a diffusers Flux-style state dict, in one original naming."""
    o, suffix = {}, names["norm_suffix"]
    for i in range(_count(sd, "transformer_blocks.")):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for wb in ("weight", "bias"):
            o[f"{b}{names['qkv'][0]}.{wb}"] = _cat(sd, [f"{d}attn.to_{x}.{wb}" for x in "qkv"])
            o[f"{b}{names['qkv'][1]}.{wb}"] = _cat(sd, [f"{d}attn.add_{x}_proj.{wb}" for x in "qkv"])
            o.update({f"{b}{dst}.{wb}": sd[f"{d}{src}.{wb}"] for src, dst in names["double"].items()
                      if f"{d}{src}.{wb}" in sd})
        o.update({f"{b}{dst}.{suffix}": sd[f"{d}{src}.weight"] for src, dst in names["double_norms"].items()})
    for i in range(_count(sd, "single_transformer_blocks.")):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for wb in ("weight", "bias"):
            o[f"{b}linear1.{wb}"] = _cat(sd, [f"{d}attn.to_{x}.{wb}" for x in "qkv"] + [f"{d}proj_mlp.{wb}"])
            o.update({f"{b}{dst}.{wb}": sd[f"{d}{src}.{wb}"] for src, dst in names["single"].items()
                      if f"{d}{src}.{wb}" in sd})
        o.update({f"{b}{dst}.{suffix}": sd[f"{d}{src}.weight"] for src, dst in names["single_norms"].items()})
    return o


def flux_to_original(sd: dict) -> dict:
    """Flux.1 / Chroma: diffusers state dict → BFL names (no prefix)."""
    o = {}
    for k, v in sd.items():
        base, _, suffix = k.rpartition(".")
        if base in _FLUX_TOP:
            o[f"{_FLUX_TOP[base]}.{suffix}"] = v
        elif m := re.fullmatch(r"distilled_guidance_layer\.layers\.(\d+)\.linear_([12])", base):
            o[f"distilled_guidance_layer.layers.{m[1]}.{'in' if m[2] == '1' else 'out'}_layer.{suffix}"] = v
        elif m := re.fullmatch(r"distilled_guidance_layer\.norms\.(\d+)\.weight", k):
            o[f"distilled_guidance_layer.norms.{m[1]}.scale"] = v
    if "norm_out.linear.weight" in sd:
        for wb in ("weight", "bias"):
            o[f"final_layer.adaLN_modulation.1.{wb}"] = swap_halves(sd[f"norm_out.linear.{wb}"])
    o.update(_blocks(sd, FLUX_BLOCKS))
    return o


# Chroma Radiance's pixel-space parts, as ComfyUI's ChromaRadiance (comfy/ldm/chroma_radiance, read at 0.3.64 and
# built at full size: patch 16, NeRF width 64, MLP ratio 4, 4 NeRF blocks, 8 DCT frequencies, conv head) holds
# them: `img_in_patch` (a Conv2d over pixel patches) replaces `img_in`, and a NeRF-style MLP head, whose
# per-patch weights `param_generator` makes from the transformer's output, replaces `final_layer`. No attention.
RADIANCE = dict(patch=2, width=4, ratio=2, depth=2, freqs=2, channels=3)   # tiny


def radiance_shapes(h: int, patch: int, width: int, ratio: int, depth: int, freqs: int, channels: int) -> dict:
    """name → shape of Radiance's pixel-space tensors for transformer width h."""
    shapes = {"img_in_patch.weight": (h, channels, patch, patch), "img_in_patch.bias": (h,),
              "nerf_image_embedder.embedder.0.weight": (width, channels + freqs ** 2),
              "nerf_image_embedder.embedder.0.bias": (width,),
              "nerf_final_layer_conv.norm.scale": (width,), "nerf_final_layer_conv.conv.weight": (channels, width, 3, 3),
              "nerf_final_layer_conv.conv.bias": (channels,)}
    for i in range(depth):   # the GLU MLP's fc1 gate, fc1 value and fc2, per patch
        shapes.update({f"nerf_blocks.{i}.param_generator.weight": (3 * width * width * ratio, h),
                       f"nerf_blocks.{i}.param_generator.bias": (3 * width * width * ratio,),
                       f"nerf_blocks.{i}.norm.scale": (width,)})
    return shapes


def radiance_head(original: dict, seed: int = 0) -> dict:
    """Chroma's original state dict → Chroma Radiance's: `img_in` and `final_layer` replaced by the pixel-space
    parts (seeded random; norm scales around 1)."""
    g = torch.Generator().manual_seed(seed + 5)
    out = {k: v for k, v in original.items() if not k.startswith(("img_in.", "final_layer."))}
    for name, shape in radiance_shapes(original["txt_in.weight"].shape[0], **RADIANCE).items():
        out[name] = 0.5 + torch.rand(shape, generator=g) if name.endswith(".scale") else torch.randn(shape, generator=g) * 0.3
    return out


_HY_TOP = {
    "context_embedder.time_text_embed.timestep_embedder.linear_1": "txt_in.t_embedder.mlp.0",
    "context_embedder.time_text_embed.timestep_embedder.linear_2": "txt_in.t_embedder.mlp.2",
    "context_embedder.time_text_embed.text_embedder.linear_1": "txt_in.c_embedder.linear_1",
    "context_embedder.time_text_embed.text_embedder.linear_2": "txt_in.c_embedder.linear_2",
    "context_embedder.proj_in": "txt_in.input_embedder", "x_embedder.proj": "img_in.proj",
    "time_text_embed.timestep_embedder.linear_1": "time_in.mlp.0",
    "time_text_embed.timestep_embedder.linear_2": "time_in.mlp.2",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.mlp.0",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.mlp.2",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "proj_out": "final_layer.linear",
}
_HY_REFINER = {"norm1": "norm1", "norm2": "norm2", "attn.to_out.0": "self_attn_proj", "ff.net.0.proj": "mlp.fc1",
               "ff.net.2": "mlp.fc2", "norm_out.linear": "adaLN_modulation.1"}
_HY_DOUBLE = {"norm1.linear": "img_mod.linear", "norm1_context.linear": "txt_mod.linear",
              "attn.to_out.0": "img_attn_proj", "attn.to_add_out": "txt_attn_proj",
              "ff.net.0.proj": "img_mlp.fc1", "ff.net.2": "img_mlp.fc2",
              "ff_context.net.0.proj": "txt_mlp.fc1", "ff_context.net.2": "txt_mlp.fc2"}
_HY_DOUBLE_NORMS = {"attn.norm_q": "img_attn_q_norm", "attn.norm_k": "img_attn_k_norm",
                    "attn.norm_added_q": "txt_attn_q_norm", "attn.norm_added_k": "txt_attn_k_norm"}
HUNYUAN_BLOCKS = {"qkv": ("img_attn_qkv", "txt_attn_qkv"), "double": _HY_DOUBLE, "double_norms": _HY_DOUBLE_NORMS,
                  "norm_suffix": "weight", "single": {"norm.linear": "modulation.linear", "proj_out": "linear2"},
                  "single_norms": {"attn.norm_q": "q_norm", "attn.norm_k": "k_norm"}}


def hunyuan_to_original(sd: dict) -> dict:
    """HunyuanVideo: diffusers state dict → Tencent names (no prefix)."""
    o = {}
    for k, v in sd.items():
        base, _, suffix = k.rpartition(".")
        if base in _HY_TOP:
            o[f"{_HY_TOP[base]}.{suffix}"] = v
    for wb in ("weight", "bias"):
        o[f"final_layer.adaLN_modulation.1.{wb}"] = swap_halves(sd[f"norm_out.linear.{wb}"])
    refiner = "context_embedder.token_refiner.refiner_blocks."
    for i in range(_count({k.removeprefix("context_embedder.token_refiner."): v for k, v in sd.items()},
                          "refiner_blocks.")):
        d, b = f"{refiner}{i}.", f"txt_in.individual_token_refiner.blocks.{i}."
        for wb in ("weight", "bias"):
            o[f"{b}self_attn_qkv.{wb}"] = _cat(sd, [f"{d}attn.to_{x}.{wb}" for x in "qkv"])
            for src, dst in _HY_REFINER.items():
                o[f"{b}{dst}.{wb}"] = sd[f"{d}{src}.{wb}"]
    o.update(_blocks(sd, HUNYUAN_BLOCKS))
    return o


# Tencent → the Flux-style names ComfyUI keeps HunyuanVideo in (and saves under `model.model.`), dit-layouts.md
# §0/§6: applied in order to each key. Not checked against a file ComfyUI saved (none is available here);
# the attention names it yields are the Flux names of §1, which the layout reads.
COMFY_HUNYUAN_RENAMES = (
    ("txt_in.t_embedder.mlp.0.", "txt_in.t_embedder.in_layer."), ("txt_in.t_embedder.mlp.2.", "txt_in.t_embedder.out_layer."),
    ("txt_in.c_embedder.linear_1.", "txt_in.c_embedder.in_layer."), ("txt_in.c_embedder.linear_2.", "txt_in.c_embedder.out_layer."),
    ("_mod.linear.", "_mod.lin."), ("_attn_qkv.", "_attn.qkv."), ("mlp.fc1.", "mlp.0."), ("mlp.fc2.", "mlp.2."),
    ("_attn_q_norm.weight", "_attn.norm.query_norm.scale"), ("_attn_k_norm.weight", "_attn.norm.key_norm.scale"),
    (".q_norm.weight", ".norm.query_norm.scale"), (".k_norm.weight", ".norm.key_norm.scale"),
    ("_attn_proj.", "_attn.proj."), (".modulation.linear.", ".modulation.lin."),
    ("_in.mlp.2.", "_in.out_layer."), ("_in.mlp.0.", "_in.in_layer."),
)


def comfy_hunyuan_name(key: str) -> str:
    for old, new in COMFY_HUNYUAN_RENAMES:
        key = key.replace(old, new)
    return key
