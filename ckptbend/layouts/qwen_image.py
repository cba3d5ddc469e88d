"""Qwen-Image (`QwenImageTransformer2DModel`), as data (dit-layouts.md §5, §11).

Its single-file names are diffusers' names (diffusers' single-file mapping is the identity), bare or under
ComfyUI's `model.diffusion_model.`: `transformer_blocks.{i}.attn.` holds the image stream `to_q/to_k/to_v/
to_out.0` with per-head RMSNorms `norm_q/norm_k`, and the text stream `add_{q,k,v}_proj/to_add_out` with
`norm_added_q/norm_added_k`; one joint attention over [text; image] → `[dit.joint]`, block label B{i:02d}.
q/k scale the norm weights, v the v projection, out the output projection (weight and bias).

Structurally dead: after the last block the text tokens are dropped, so that block's text-stream q and out
(`norm_added_q`, `to_add_out`) have no effect on the result; its text k and v still do.
"""

from __future__ import annotations

from .sd3 import diffusers_joint_sites, dit_names, file_components, model_names
from .types import CheckpointFile, Identified, Site

COMPONENTS = ("dit",)
MARKS = ("txt_norm.weight", "img_in.weight", "transformer_blocks.0.attn.add_q_proj.weight")
MODEL_STARTS = ("txt_norm.", "img_in.", "txt_in.", "transformer_blocks.", "time_text_embed.", "norm_out.",
                "proj_out.")
ARCHITECTURE = "qwen-image"
TEXT_DROPPED = "the text tokens are dropped after the last block, so its text-stream q and out cannot act"
TRANSFORMER_CLASS = "QwenImageTransformer2DModel"
ARCHITECTURE_NAMES = {ARCHITECTURE: (ARCHITECTURE,)}

_QWEN_FOLDERS = {"transformer": "dit", "text_encoder": "qwen25_7b"}
DIFFUSERS_PIPELINES = {cls: _QWEN_FOLDERS for cls in (
    "QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline", "QwenImageEditPipeline",
    "QwenImageEditPlusPipeline", "QwenImageEditInpaintPipeline")}


def _is_qwen_image(names: set[str]) -> bool:
    return all(m in names for m in MARKS)


def identify(header) -> Identified | None:
    components = file_components(header.names, lambda rest: rest.startswith(MODEL_STARTS))
    if not _is_qwen_image(dit_names(components)):
        return None
    only_model = set(components.values()) == {"dit"}
    return Identified("dit" if only_model else "single-file", ARCHITECTURE, components)


def sites(cf: CheckpointFile, files) -> list[Site]:
    names = model_names(files)
    if not _is_qwen_image(names):
        return []
    last = max(int(n.split(".")[1]) for n in names if n.startswith("transformer_blocks."))
    return diffusers_joint_sites(cf, names, "B", self_attn2=False, inert=lambda i, stream, proj: TEXT_DROPPED if (
        i == last and stream == "text" and proj in ("q", "out")) else None)


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return ARCHITECTURE if model_class == TRANSFORMER_CLASS else None


def has_qk_norm(files) -> bool:
    return _is_qwen_image(model_names(files))
