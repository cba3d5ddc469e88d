"""Qwen-Image (`QwenImageTransformer2DModel`: Qwen-Image, 2512, Edit, Edit 2509/2511, Layered) and
Qwen-Image 2.1 (`QwenImage21Transformer2DModel`), as data (dit-layouts.md §5, §11).

Qwen-Image: single-file names are diffusers' names (diffusers' single-file mapping is the identity), bare or
under ComfyUI's `model.diffusion_model.`: `transformer_blocks.{i}.attn.` holds the image stream `to_q/to_k/
to_v/to_out.0` with per-head RMSNorms `norm_q/norm_k`, and the text stream `add_{q,k,v}_proj/to_add_out` with
`norm_added_q/norm_added_k`; one joint attention over [text; image] → `[dit.joint]`, block label B{i:02d}.
2512 and Edit 2511 (`zero_cond_t`: per-token modulation of the condition image) have exactly these keys
and are `qwen-image`; Layered adds `time_text_embed.addition_t_embedding` (and a 3-D RoPE, no key) and is
`qwen-image-layered`, with the same blocks.

Qwen-Image 2.1: single-stream blocks, one weight set for the joined [text; condition images; target]
sequence → `[dit.joint]` without streams, B{i:02d}: `transformer_blocks.{i}.attn.{to_q,to_k,to_v,to_out.0}`
(no biases anywhere) and `norm_q/norm_k` (per-head RMSNorm, plain weight); ComfyUI's file differs from
diffusers only by the fused MLP `img_mlp.gate_up`. Its attention output goes straight to the gated
residual, so out acts.

q/k scale the norm weights, v the v projection, out the output projection (weight and bias where there is
one). Structurally dead (Qwen-Image): after the last block the text tokens are dropped, so that block's
text-stream q and out (`norm_added_q`, `to_add_out`) have no effect on the result; its text k and v still do.
A file with parts these tables do not describe is refused by name, never baked as a Qwen-Image.
"""

from __future__ import annotations

import re

from ..errors import CkptbendError
from .sd3 import diffusers_joint_sites, dit_names, file_components, model_names
from .types import CheckpointFile, Identified, Site

COMPONENTS = ("dit",)
MARKS = ("txt_norm.weight", "img_in.weight", "transformer_blocks.0.attn.add_q_proj.weight")
MARKS_21 = ("txt_in.text_norm.weight", "modulation.1.weight", "transformer_blocks.0.attn.norm_q.weight")
LAYERED = "time_text_embed.addition_t_embedding.weight"
# Every top-level part of the two models (and ComfyUI's scaled-fp8 marker); anything else is another model.
PARTS = {"qwen-image": {"txt_norm", "img_in", "txt_in", "transformer_blocks", "time_text_embed", "norm_out", "proj_out"},
         "qwen-image-2.1": {"txt_in", "img_in", "modulation", "transformer_blocks", "time_text_embed", "norm_out",
                            "proj_out"}}
MARKER = "scaled_fp8"
MODEL_STARTS = tuple(f"{p}." for parts in PARTS.values() for p in parts)
TEXT_DROPPED = "the text tokens are dropped after the last block, so its text-stream q and out cannot act"
SINGLE_STREAM = re.compile(r"^(?:model\.diffusion_model\.)?transformer_blocks\.(?P<i>\d+)\.attn\."
                           r"(?P<m>norm_q|norm_k|to_v|to_out\.0)\.(?:weight|bias)$")
SINGLE_PROJ = {"norm_q": "q", "norm_k": "k", "to_v": "v", "to_out.0": "out"}

ARCHITECTURE_NAMES = {"qwen-image": ("qwen-image", "qwen-image-layered"), "qwen-image-layered": ("qwen-image-layered",),
                      "qwen-image-2.1": ("qwen-image-2.1",)}
FOLDER_CLASSES = {"QwenImageTransformer2DModel": "qwen-image", "QwenImage21Transformer2DModel": "qwen-image-2.1"}

_QWEN_FOLDERS = {"transformer": "dit", "text_encoder": "qwen25_7b"}
DIFFUSERS_PIPELINES = {cls: _QWEN_FOLDERS for cls in (
    "QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
    "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline", "QwenImageLayeredPipeline")}


def _model(names: set[str]) -> str | None:
    """qwen-image or qwen-image-2.1 by their detection keys, or None."""
    if all(m in names for m in MARKS):
        return "qwen-image"
    return "qwen-image-2.1" if all(m in names for m in MARKS_21) else None


def architecture(names: set[str], where) -> str | None:
    model = _model(names)
    if model is None:
        return None
    unknown = sorted({n.split(".", 1)[0] for n in names} - PARTS[model] - {MARKER})
    if unknown:
        raise CkptbendError(f"{where}: a {model} transformer with parts ckptbend does not know "
                            f"({', '.join(p + '.*' for p in unknown)}); refusing rather than baking it as {model}")
    return "qwen-image-layered" if model == "qwen-image" and LAYERED in names else model


def identify(header) -> Identified | None:
    components = file_components(header.names, lambda rest: rest.startswith(MODEL_STARTS))
    arch = architecture(dit_names(components), header.path.name)
    if arch is None:
        return None
    return Identified.model_file(arch, components)


def _single_stream_sites(cf: CheckpointFile) -> list[Site]:
    return [Site(cf.rel, t.name, "dit", "joint", SINGLE_PROJ[m["m"]], block=f"B{int(m['i']):02d}")
            for t in cf.header.tensors if cf.components.get(t.name) == "dit" and (m := SINGLE_STREAM.match(t.name))]


def sites(cf: CheckpointFile, files) -> list[Site]:
    names = model_names(files)
    model = _model(names)
    if model is None:
        return []
    if model == "qwen-image-2.1":
        return _single_stream_sites(cf)
    last = max(int(n.split(".")[1]) for n in names if n.startswith("transformer_blocks."))
    return diffusers_joint_sites(cf, names, "B", self_attn2=False, inert=lambda i, stream, proj: TEXT_DROPPED if (
        i == last and stream == "text" and proj in ("q", "out")) else None)


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    name = FOLDER_CLASSES.get(model_class)
    return "qwen-image-layered" if name == "qwen-image" and (config or {}).get("use_additional_t_cond") else name


def has_qk_norm(files) -> bool:
    return _model(model_names(files)) is not None
