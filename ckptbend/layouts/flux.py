"""Flux.1 (dev, schnell), Chroma, HunyuanVideo, LongCat-Image and Ovis-Image: the double/single-stream diffusion
transformers, as data.

All three share one attention structure (dit-layouts.md §1, §6, §7, §11): *double* blocks, where the image
and the text stream each project their own q/k/v (fused `qkv`, rows q | k | v) and normalise q and k per
head (one RMSNorm weight shared by the heads), then attend jointly; and *single* blocks, one weight set for
the joined sequence, whose `linear1` holds q | k | v | MLP-in rows and whose `linear2` reads the attention
output (columns [0, h)) and the MLP (the rest) through one shared bias.

What a factor scales (§11): q/k the qk-norm weight (scaling the projection is cancelled by the norm); v the
v rows [2h, 3h) of the fused projection; out the output projection, weight and bias — except single
blocks, where only `linear2`'s attention columns [0, h) are scaled and its bias, shared with the MLP, stays.

Names come in three spellings: BFL's (Flux, Chroma; also HunyuanVideo as ComfyUI saves it), Tencent's
(HunyuanVideo's own release) and diffusers' (all three, one table). HunyuanVideo's text token refiner
(`txt_in.individual_token_refiner`, no qk-norm) is a pre-processing of the text embedding, not the joint
attention: no section reaches it.

LongCat-Image and Ovis-Image are Flux.1's blocks in other models (ComfyUI runs both as its Flux class), with
Flux.1's rule. Ovis-Image's SwiGLU MLP adds one: its single-block `linear1` holds q | k | v | value | gate
(3h + 2M rows; diffusers keeps q/k/v apart and `proj_mlp` holds the 2M) while `linear2` reads h + M columns,
so the fused lengths are told from each other by the `*_GATED` parts. diffusers has no single-file converter
for either: the diffusers names are the classes' own, the original names ComfyUI's.

HunyuanVideo 1.5 (8.3B; diffusers `HunyuanVideo15Transformer3DModel`, ComfyUI's HunyuanVideo class with
`cond_type_embedding`, `byt5_in`, `vision_in`) keeps HunyuanVideo's double block and has no single blocks:
54 double blocks, 16 heads × 128, the same per-head qk-norm and the same rule, image | text streams joined
[image; text]. Its ByT5 projection (`byt5_in`, diffusers `context_embedder_2`) and image projection hold no
attention. Tencent's own file is taken to split q, k and v (`img_attn_q/k/v`): v then scales `img_attn_v` whole.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import CkptbendError
from .text_encoders import TEXT_ENCODERS
from .types import CheckpointFile, Identified, Site
from .validate import shape_in, weight_of

COMPONENTS = ("dit",)


@dataclass(frozen=True)
class Part:
    """Where the attention sits in a fused tensor: rows [a·h, b·h) of a fused input projection (and its bias),
    or input columns [a·h, b·h) of a fused output projection (weight only). The fused axis holds `whole`·h,
    plus the MLP width where the tensor also feeds or reads the MLP: `mlp(shape)` of the block's `sibling`."""
    axis: str                       # rows | cols
    a: int
    b: int
    whole: int
    module: str = ""                # the fused module's name, to find its sibling in the same block
    sibling: str | None = None
    mlp: Callable | None = None


V_QKV = Part("rows", 2, 3, 3)
V_LINEAR1 = Part("rows", 2, 3, 3, "linear1", "linear2.weight", lambda s: s[1] - s[0])   # q|k|v|MLP rows
OUT_LINEAR2 = Part("cols", 0, 1, 1, "linear2", "linear1.weight", lambda s: s[0] - 3 * s[1])   # attention|MLP cols
OUT_PROJ_OUT = Part("cols", 0, 1, 1, "proj_out", "proj_mlp.weight", lambda s: s[0])   # diffusers' linear2
# Gated (SwiGLU) MLP in a fused single block (Ovis-Image; Flux.2 without biases): linear1 = q|k|v + 2M rows
# (value | gate), linear2 = h + M columns; diffusers' Ovis keeps q/k/v apart and `proj_mlp` holds the 2M rows.
V_LINEAR1_GATED = Part("rows", 2, 3, 3, "linear1", "linear2.weight", lambda s: 2 * (s[1] - s[0]))
OUT_LINEAR2_GATED = Part("cols", 0, 1, 1, "linear2", "linear1.weight", lambda s: (s[0] - 3 * s[1]) // 2)
OUT_PROJ_OUT_GATED = Part("cols", 0, 1, 1, "proj_out", "proj_mlp.weight", lambda s: s[0] // 2)

# (pattern on the key after the model prefix, proj, stream, part); `group`/`i` name the block; part None:
# the whole tensor.
_D, _S = r"(?P<group>double)_blocks\.(?P<i>\d+)\.", r"(?P<group>single)_blocks\.(?P<i>\d+)\."
_DD, _DS = r"(?P<group>)transformer_blocks\.(?P<i>\d+)\.attn\.", r"(?P<group>single)_transformer_blocks\.(?P<i>\d+)\."


def _double(prefix_of_stream: dict, names: dict) -> list:
    """The double-block rows of a naming: per stream, q/k/v/out names under the stream's prefix."""
    return [(prefix_of_stream[stream] + names[proj], proj, stream, V_QKV if proj == "v" and "qkv" in names[proj]
             else None) for stream in ("image", "text") for proj in ("q", "k", "v", "out")]


BFL = tuple(_double({"image": _D + "img_attn", "text": _D + "txt_attn"},
                    {"q": r"\.norm\.query_norm\.scale", "k": r"\.norm\.key_norm\.scale",
                     "v": r"\.qkv\.(?:weight|bias)", "out": r"\.proj\.(?:weight|bias)"})) + (
    (_S + r"norm\.query_norm\.scale", "q", None, None),
    (_S + r"norm\.key_norm\.scale", "k", None, None),
    (_S + r"linear1\.(?:weight|bias)", "v", None, V_LINEAR1),
    (_S + r"linear2\.weight", "out", None, OUT_LINEAR2),
)
TENCENT = tuple(_double({"image": _D + "img_attn_", "text": _D + "txt_attn_"},
                        {"q": r"q_norm\.weight", "k": r"k_norm\.weight", "v": r"qkv\.(?:weight|bias)",
                         "out": r"proj\.(?:weight|bias)"})) + (
    (_S + r"q_norm\.weight", "q", None, None),
    (_S + r"k_norm\.weight", "k", None, None),
    (_S + r"linear1\.(?:weight|bias)", "v", None, V_LINEAR1),
    (_S + r"linear2\.weight", "out", None, OUT_LINEAR2),
)
DIFFUSERS = (
    (_DD + r"norm_q\.weight", "q", "image", None),
    (_DD + r"norm_k\.weight", "k", "image", None),
    (_DD + r"to_v\.(?:weight|bias)", "v", "image", None),
    (_DD + r"to_out\.0\.(?:weight|bias)", "out", "image", None),
    (_DD + r"norm_added_q\.weight", "q", "text", None),
    (_DD + r"norm_added_k\.weight", "k", "text", None),
    (_DD + r"add_v_proj\.(?:weight|bias)", "v", "text", None),
    (_DD + r"to_add_out\.(?:weight|bias)", "out", "text", None),
    (_DS + r"attn\.norm_q\.weight", "q", None, None),
    (_DS + r"attn\.norm_k\.weight", "k", None, None),
    (_DS + r"attn\.to_v\.(?:weight|bias)", "v", None, None),
    (_DS + r"proj_out\.weight", "out", None, OUT_PROJ_OUT),
)
# HunyuanVideo 1.5 as Tencent releases it (*names unverified on a real file*): q, k and v in separate projections.
TENCENT15 = tuple(_double({"image": _D + "img_attn_", "text": _D + "txt_attn_"},
                          {"q": r"q_norm\.weight", "k": r"k_norm\.weight", "v": r"v\.(?:weight|bias)",
                           "out": r"proj\.(?:weight|bias)"}))
_GATED = {OUT_LINEAR2: OUT_LINEAR2_GATED, V_LINEAR1: V_LINEAR1_GATED, OUT_PROJ_OUT: OUT_PROJ_OUT_GATED}
NAMINGS = {"bfl": BFL, "tencent": TENCENT, "tencent15": TENCENT15, "diffusers": DIFFUSERS,
           **{f"{n}-gated": tuple((*row[:3], _GATED.get(row[3], row[3])) for row in t)
              for n, t in (("bfl", BFL), ("diffusers", DIFFUSERS))}}
COMPILED = {n: tuple((re.compile(p + "$"), *rest) for p, *rest in table) for n, table in NAMINGS.items()}

# Architectures: (name, naming, keys that must all be present, keys that must all be absent), after the
# model prefix; first match wins. Flux.2 (model-level modulation) is layouts/flux2.py's. Flux.1 always has its
# pooled-text input (`vector_in` / `text_embedder`). LongCat-Image is Flux.1's blocks with neither a pooled-text
# nor a guidance input (ComfyUI runs it as its Flux class with `vec_in_dim` None); Ovis-Image is Flux.1's
# blocks with a SwiGLU MLP (ComfyUI's `yak_mlp`: `img_mlp.gate_proj`, single-block `linear1` 3h + 2M rows) and
# a text RMSNorm (`txt_norm`). Other Flux-style files are refused below rather than named Flux.1. Chroma1-HD is Chroma's
# layout (diffusers' Chroma single-file default is Chroma1-HD); Chroma Radiance is Chroma's blocks in pixel
# space: `img_in_patch` (a conv) for `img_in` and a NeRF-style MLP head (`nerf_*`, no attention) for
# `final_layer` (ComfyUI's ChromaRadiance builds its blocks from Chroma's classes).
_BFL_DOUBLE, _DIFF_SINGLE = "double_blocks.0.img_attn.norm.key_norm.scale", "single_transformer_blocks.0.proj_mlp.weight"
_REFINER = "txt_in.individual_token_refiner.blocks.0.norm1.weight"
_GUIDANCE_LAYER = "distilled_guidance_layer.in_proj.weight"
_OVIS = "double_blocks.0.img_mlp.gate_proj.weight"
_OTHERS = ("single_stream_modulation.lin.weight", _OVIS)   # Flux.2, Ovis
_NOT_LONGCAT = (*_OTHERS, "vector_in.in_layer.weight", "guidance_in.in_layer.weight", _GUIDANCE_LAYER)
_HV15, _HV15_DIFFUSERS = "cond_type_embedding.weight", "cond_type_embed.weight"   # ComfyUI's / diffusers' key
ARCHITECTURES = (
    ("hunyuan-video-1.5", "tencent15", ("double_blocks.0.img_attn_v.weight", _REFINER), ()),
    ("hunyuan-video-1.5", "tencent", ("double_blocks.0.img_attn_k_norm.weight", _REFINER, _HV15), ()),
    ("hunyuan-video-1.5", "bfl", (_BFL_DOUBLE, _REFINER, _HV15), ()),
    ("hunyuan-video-1.5", "diffusers", ("transformer_blocks.0.attn.norm_added_k.weight", _HV15_DIFFUSERS), ()),
    ("hunyuan-video", "tencent", ("double_blocks.0.img_attn_k_norm.weight", _REFINER), ()),
    ("hunyuan-video", "bfl", (_BFL_DOUBLE, _REFINER), ()),          # as ComfyUI saves it (model.model.)
    ("chroma-radiance", "bfl", (_BFL_DOUBLE, _GUIDANCE_LAYER, "img_in_patch.weight", "nerf_blocks.0.norm.scale"), _OTHERS),
    ("chroma", "bfl", (_BFL_DOUBLE, _GUIDANCE_LAYER, "img_in.weight", "final_layer.linear.weight"), _OTHERS),
    ("flux-dev", "bfl", (_BFL_DOUBLE, "img_in.weight", "vector_in.in_layer.weight", "guidance_in.in_layer.weight"), _OTHERS),
    ("flux-schnell", "bfl", (_BFL_DOUBLE, "img_in.weight", "vector_in.in_layer.weight"), _OTHERS),
    ("longcat-image", "bfl", (_BFL_DOUBLE, "img_in.weight", "txt_in.weight", "time_in.in_layer.weight"), _NOT_LONGCAT),
    ("ovis-image", "bfl-gated", (_BFL_DOUBLE, "img_in.weight", _OVIS), _OTHERS[:1]),
    ("hunyuan-video", "diffusers", (_DIFF_SINGLE, "context_embedder.token_refiner.refiner_blocks.0.norm1.weight"), ()),
    ("chroma", "diffusers", (_DIFF_SINGLE, _GUIDANCE_LAYER), ()),
    ("flux-dev", "diffusers", (_DIFF_SINGLE, "x_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
                               "time_text_embed.guidance_embedder.linear_1.weight"), ()),
    ("flux-schnell", "diffusers", (_DIFF_SINGLE, "x_embedder.weight", "time_text_embed.text_embedder.linear_1.weight"), ()),
    ("longcat-image", "diffusers", (_DIFF_SINGLE, "x_embedder.weight", "time_embed.timestep_embedder.linear_1.weight"), ()),
    ("ovis-image", "diffusers-gated", (_DIFF_SINGLE, "x_embedder.weight", "context_embedder_norm.weight"), ()),
)
# Flux-style blocks of a model none of the rows above describes: refused by name, never taken for Flux.1.
UNKNOWN_RELATIVE = ("{path}: Flux-style double/single blocks, but not Flux.1, Flux.2, Chroma, Chroma Radiance, "
                    "HunyuanVideo, LongCat-Image or Ovis-Image as ckptbend knows them ({why}); refusing rather than "
                    "guessing its attention layout")
RELATIVES = (("vector_in.", "an unknown mix of inputs"),
             ("", "no pooled-text input, yet not LongCat-Image's inputs (img_in, txt_in, time_in only)"))
# recipe `architecture` name → the detected architectures it covers ("flux": dev, schnell, and a diffusers
# folder that does not say which; the two share their blocks; "chroma": Chroma and Radiance, the same blocks).
ARCHITECTURE_NAMES = {"flux": ("flux", "flux-dev", "flux-schnell"), "flux-dev": ("flux-dev",),
                      "flux-schnell": ("flux-schnell",), "chroma": ("chroma", "chroma-radiance"),
                      "chroma-radiance": ("chroma-radiance",), "hunyuan-video": ("hunyuan-video",),
                      "hunyuan-video-1.5": ("hunyuan-video-1.5",), "longcat-image": ("longcat-image",),
                      "ovis-image": ("ovis-image",)}
# diffusers transformer class → architecture (a folder does not say dev or schnell: FluxPipeline serves both).
FOLDER_ARCHITECTURES = {"FluxTransformer2DModel": "flux", "ChromaTransformer2DModel": "chroma",
                        "HunyuanVideoTransformer3DModel": "hunyuan-video",
                        "HunyuanVideo15Transformer3DModel": "hunyuan-video-1.5",
                        "LongCatImageTransformer2DModel": "longcat-image", "OvisImageTransformer2DModel": "ovis-image"}

# Where the model sits in a file: ComfyUI writes `model.diffusion_model.` (HunyuanVideo: `model.model.`);
# released files have no prefix. Text encoders and VAE of ComfyUI all-in-one files (Chroma keeps the
# default `cond_stage_model.` / `first_stage_model.`).
MODEL_PREFIXES = ("model.diffusion_model.", "model.model.")
ENCODER_PREFIX = re.compile(r"(?:text_encoders|cond_stage_model)\.(?P<name>" + "|".join(TEXT_ENCODERS) + r")\.")
VAE_PREFIXES = ("vae.", "first_stage_model.")

_PIPELINE_SUBS = {
    "flux": {"transformer": "dit", "text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
    "chroma": {"transformer": "dit", "text_encoder": "t5xxl"},
    "hunyuan": {"transformer": "dit", "text_encoder": "llama", "text_encoder_2": "clip_l"},
}
DIFFUSERS_PIPELINES = {
    **{p: _PIPELINE_SUBS["flux"] for p in ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline",
                                           "FluxFillPipeline", "FluxKontextPipeline", "FluxControlPipeline")},
    **{p: _PIPELINE_SUBS["chroma"] for p in ("ChromaPipeline", "ChromaImg2ImgPipeline", "ChromaInpaintPipeline")},
    **{p: _PIPELINE_SUBS["hunyuan"] for p in ("HunyuanVideoPipeline", "HunyuanVideoImageToVideoPipeline",
                                              "HunyuanSkyreelsImageToVideoPipeline")},
}


def _model_prefix(names) -> str:
    return next((p for p in MODEL_PREFIXES if sum(n.startswith(p) for n in names) > 5), "")


def _match(names: set, prefix: str):
    """(architecture, naming) of the model under `prefix`, or None."""
    for arch, naming, needed, absent in ARCHITECTURES:
        if all(prefix + k in names for k in needed) and not any(prefix + k in names for k in absent):
            return arch, naming
    return None


def _component(key: str, prefix: str) -> str | None:
    if m := ENCODER_PREFIX.match(key):
        return m["name"]
    if key.startswith(VAE_PREFIXES):
        return "vae"
    return "dit" if key.startswith(prefix) else None


def refuse_unknown(header) -> None:
    """Asked when no family identified a file: Flux-style blocks of a model none of ARCHITECTURES describes
    (Flux.2 is layouts/flux2.py's) are refused by name."""
    names = set(header.names)
    prefix = _model_prefix(names)
    if prefix + _BFL_DOUBLE in names or prefix + _DIFF_SINGLE in names:
        why = next(why for mark, why in RELATIVES if any(n.startswith(prefix) and mark in n for n in names))
        raise CkptbendError(UNKNOWN_RELATIVE.format(path=header.path, why=why))


def identify(header) -> Identified | None:
    names = set(header.names)
    prefix = _model_prefix(names)
    found = _match(names, prefix)
    if found is None:
        return None
    components = {n: c for n in header.names if (c := _component(n, prefix))}
    only_model = set(components.values()) == {"dit"}
    return Identified("dit" if only_model else "single-file", found[0], components)


def _naming(files) -> tuple[str, str] | None:
    """(naming, model prefix) of the checkpoint's transformer: told from all its files (shards split anywhere)."""
    names = {n for f in files for n, c in f.components.items() if c == "dit"}
    prefix = _model_prefix(names)
    found = _match(names, prefix)
    return (found[1], prefix) if found else None


def _span(files, cf: CheckpointFile, key: str, part: Part) -> tuple[tuple[int, int], int | None]:
    """(span, length of the fused axis) of a fused tensor. h is the input width of a fused input projection
    (its weight's columns), the output width of a fused output projection (its rows)."""
    shape = shape_in(files, cf.rel, weight_of(key))
    if shape is None or len(shape) != 2:
        return (0, 0), None                        # validate refuses the tensor (no weight, or not 2-D)
    h = shape[1] if part.axis == "rows" else shape[0]
    if part.sibling is None:
        return (part.a * h, part.b * h), part.whole * h
    sibling = shape_in(files, cf.rel, key[:key.rindex(part.module)] + part.sibling)
    mlp = part.mlp(sibling) if sibling is not None and len(sibling) == 2 else None
    return (part.a * h, part.b * h), None if mlp is None else part.whole * h + mlp


def sites(cf: CheckpointFile, files) -> list[Site]:
    """The double and single blocks' attention tensors of one file."""
    found_naming = _naming(files)
    if found_naming is None:
        return []
    naming, prefix = found_naming
    return block_sites(cf, files, COMPILED[naming], prefix)


def block_sites(cf: CheckpointFile, files, table, prefix: str) -> list[Site]:
    """The sites of one file's double (D) and single (S) blocks by a compiled table of (pattern, proj, stream,
    part) rows (Flux.2 shares this engine with its own table)."""
    found = []
    for t in cf.header.tensors:
        if cf.components.get(t.name) != "dit" or not t.name.startswith(prefix):
            continue
        key = t.name[len(prefix):]
        for pattern, proj, stream, part in table:
            if m := pattern.match(key):
                single = m["group"] == "single"
                span, fused = _span(files, cf, t.name, part) if part else (None, None)
                found.append(Site(cf.rel, t.name, "dit", "joint", proj,
                                  rows=span if part and part.axis == "rows" else None,
                                  cols=span if part and part.axis == "cols" else None,
                                  group="single" if single else "double",
                                  block=f"{'S' if single else 'D'}{int(m['i']):02d}", stream=stream, fused=fused))
                break
    return found


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    name = FOLDER_ARCHITECTURES.get(model_class)
    if name == "flux" and config and "guidance_embeds" in config:   # the transformer config tells dev from schnell
        return "flux-dev" if config["guidance_embeds"] else "flux-schnell"
    return name


def has_qk_norm(files) -> bool:
    return False   # no unet.* sites here: q/k factors of [dit.joint] scale the qk-norm weight itself
