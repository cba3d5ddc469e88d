"""Text encoders: CLIP-L (HF names), OpenCLIP ViT-H / ViT-bigG (OpenCLIP names, fused in_proj), as data.

A projection is found by key suffix, as ComfyUI's CLIPAttentionMultiply finds it; OpenCLIP's fused
`attn.in_proj_weight` / `in_proj_bias` hold q, k and v as three row ranges.
"""

from __future__ import annotations

import re

from .types import CheckpointFile, Site

COMPONENTS = TEXT_ENCODERS = ("clip_l", "clip_g", "clip_h")
TEXT_ENCODER_WIDTHS = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}

HF_CLIP_SUFFIX = re.compile(r"(?:^|\.)self_attn\.(?P<proj>q_proj|k_proj|v_proj|out_proj)\.(?:weight|bias)$")
OPENCLIP_SUFFIX = re.compile(r"(?:^|\.)resblocks\.\d+\.attn\.(?P<proj>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$")
PROJ_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "out",
              "out_proj.weight": "out", "out_proj.bias": "out"}
FUSED_ORDER = ("q", "k", "v")

# Text encoders are found inside other families' files and folders: nothing of their own to detect.
SINGLE_FILE_PREFIXES = ()
ARCHITECTURES = ()
DIFFUSERS_FOLDERS = {}


def folder_architecture(model_class: str, present: set[str]) -> str | None:
    return None


def sites(cf: CheckpointFile, files) -> list[Site]:
    """The text encoders' attention projections in one file."""
    found = []
    for t in cf.header.tensors:
        component = cf.components.get(t.name)
        if component not in TEXT_ENCODERS:
            continue
        if m := HF_CLIP_SUFFIX.search(t.name):
            found.append(Site(cf.rel, t.name, component, "self", PROJ_NAMES[m["proj"]]))
        elif m := OPENCLIP_SUFFIX.search(t.name):
            if m["proj"].startswith("in_proj"):
                # Fused [3d, d] / [3d]: rows 0:d are q, d:2d k, 2d:3d v.
                d = t.shape[0] // 3
                for i, proj in enumerate(FUSED_ORDER):
                    found.append(Site(cf.rel, t.name, component, "self", proj, rows=(i * d, (i + 1) * d)))
            else:
                found.append(Site(cf.rel, t.name, component, "self", PROJ_NAMES[m["proj"]]))
    return found


def bare_kind(header) -> str | None:
    """Which text encoder a file saved alone holds, or None."""
    names = header.names
    hf, openclip = any(HF_CLIP_SUFFIX.search(n) for n in names), any(OPENCLIP_SUFFIX.search(n) for n in names)
    if not (hf or openclip):
        return None
    # The three text encoders SD files use differ in width; a small or unknown one is told by its form:
    # HF-named with a projection is SDXL's CLIP-G; OpenCLIP-named is bigG too unless 1024 wide.
    norm = next((n for n in names if n.endswith(("final_layer_norm.weight", "ln_final.weight"))), None)
    shape = header.tensor(norm).shape if norm else ()
    width = shape[0] if len(shape) == 1 else None
    if width in TEXT_ENCODER_WIDTHS:
        return TEXT_ENCODER_WIDTHS[width]
    if hf:
        return "clip_g" if "text_projection.weight" in names else "clip_l"
    return "clip_g"
