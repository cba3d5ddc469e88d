"""Text encoders, as data: CLIP-L / CLIP-G (HF names), OpenCLIP ViT-H / ViT-bigG (OpenCLIP names, fused
in_proj), and the large encoders of DiT models: T5-XXL, UMT5-XXL (T5 names), Qwen2.5-VL-7B and Llama-3-8B
(HF decoder names).

A projection is found by key suffix, as ComfyUI's CLIPAttentionMultiply finds CLIP's; OpenCLIP's
fused `attn.in_proj_weight` / `in_proj_bias` hold q, k and v as three row ranges. None of these
encoders normalises q or k, so every factor scales projection rows (dit-layouts.md §11).
"""

from __future__ import annotations

import re

from .types import CheckpointFile, Identified, Site

CLIP_ENCODERS = ("clip_l", "clip_g", "clip_h")                   # the [clip] section (CLIPAttentionMultiply)
LARGE_ENCODERS = ("t5xxl", "umt5xxl", "qwen25_7b", "llama")      # the [text] section; ComfyUI's names
COMPONENTS = TEXT_ENCODERS = CLIP_ENCODERS + LARGE_ENCODERS
TEXT_ENCODER_WIDTHS = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}

HF_CLIP_SUFFIX = re.compile(r"(?:^|\.)self_attn\.(?P<proj>q_proj|k_proj|v_proj|out_proj)\.(?:weight|bias)$")
OPENCLIP_SUFFIX = re.compile(r"(?:^|\.)resblocks\.\d+\.attn\.(?P<proj>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$")
T5_SUFFIX = re.compile(r"(?:^|\.)block\.\d+\.layer\.0\.SelfAttention\.(?P<proj>q|k|v|o)\.weight$")
# Decoder-only LLMs: the language model's layers only (Qwen2.5-VL's vision tower is `visual.blocks.N.attn`).
LLM_SUFFIX = re.compile(r"(?:^|\.)layers\.\d+\.self_attn\.(?P<proj>q_proj|k_proj|v_proj|o_proj)\.(?:weight|bias)$")
PROJ_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "out", "o_proj": "out",
              "out_proj.weight": "out", "out_proj.bias": "out", "q": "q", "k": "k", "v": "v", "o": "out"}
FUSED_ORDER = ("q", "k", "v")
SUFFIX_OF = {"clip_l": (HF_CLIP_SUFFIX, OPENCLIP_SUFFIX), "clip_g": (HF_CLIP_SUFFIX, OPENCLIP_SUFFIX),
             "clip_h": (HF_CLIP_SUFFIX, OPENCLIP_SUFFIX), "t5xxl": (T5_SUFFIX,), "umt5xxl": (T5_SUFFIX,),
             "qwen25_7b": (LLM_SUFFIX,), "llama": (LLM_SUFFIX,)}

# ComfyUI's all-in-one files: `text_encoders.<name>.transformer.…` (DiT families use it for their files).
ALL_IN_ONE = re.compile(r"text_encoders\.(?P<name>" + "|".join(TEXT_ENCODERS) + r")\.")

# diffusers text-encoder folders, by the transformers model_type in their config.json.
MODEL_TYPES = {"t5": "t5xxl", "umt5": "umt5xxl", "qwen2_5_vl": "qwen25_7b", "llama": "llama"}

# Text encoders live inside other families' files and folders, or alone (identify).
SINGLE_FILE_PREFIXES = ()
DIFFUSERS_FOLDERS = {}
DIFFUSERS_PIPELINES = {}


def all_in_one_component(key: str) -> str | None:
    m = ALL_IN_ONE.match(key)
    return m["name"] if m else None


def sites(cf: CheckpointFile, files) -> list[Site]:
    """The text encoders' attention projections in one file."""
    found = []
    for t in cf.header.tensors:
        component = cf.components.get(t.name)
        m = next((m for pattern in SUFFIX_OF.get(component, ()) if (m := pattern.search(t.name))), None)
        if m is None:
            continue
        if m["proj"].startswith("in_proj"):
            # OpenCLIP's fused [3d, d] / [3d]: rows 0:d are q, d:2d k, 2d:3d v.
            d = t.shape[0] // 3
            for i, proj in enumerate(FUSED_ORDER):
                found.append(Site(cf.rel, t.name, component, "self", proj, rows=(i * d, (i + 1) * d)))
        else:
            found.append(Site(cf.rel, t.name, component, "self", PROJ_NAMES[m["proj"]]))
    return found


def _large_kind(names) -> str | None:
    if any(T5_SUFFIX.search(n) for n in names):
        # UMT5 keeps a relative-position table in every block, T5 only in block 0.
        umt5 = any(n.endswith("block.1.layer.0.SelfAttention.relative_attention_bias.weight") for n in names)
        return "umt5xxl" if umt5 else "t5xxl"
    if any(LLM_SUFFIX.search(n) and n.endswith("o_proj.weight") for n in names):
        return "qwen25_7b" if any(n.endswith("self_attn.k_proj.bias") for n in names) else "llama"
    return None


def bare_kind(header) -> str | None:
    """Which text encoder a file saved alone holds, or None."""
    names = header.names
    if large := _large_kind(names):
        return large
    hf, openclip = any(HF_CLIP_SUFFIX.search(n) for n in names), any(OPENCLIP_SUFFIX.search(n) for n in names)
    if not (hf or openclip):
        return None
    # The three CLIP encoders SD files use differ in width; a small or unknown one is told by its form:
    # HF-named with a projection is SDXL's CLIP-G; OpenCLIP-named is bigG too unless 1024 wide.
    norm = next((n for n in names if n.endswith(("final_layer_norm.weight", "ln_final.weight"))), None)
    shape = header.tensor(norm).shape if norm else ()
    width = shape[0] if len(shape) == 1 else None
    if width in TEXT_ENCODER_WIDTHS:
        return TEXT_ENCODER_WIDTHS[width]
    if hf:
        return "clip_g" if "text_projection.weight" in names else "clip_l"
    return "clip_g"


def identify(header) -> Identified | None:
    kind = bare_kind(header)
    return Identified("text-encoder", f"{kind}-only", {n: kind for n in header.names}) if kind else None


def folder_component(default: str, config: dict) -> str:
    """A diffusers text-encoder folder's component: the pipeline's default, refined by its config
    (SD 2.x's text_encoder is OpenCLIP-H in HF names: told from CLIP-L by its activation)."""
    if config.get("model_type") in MODEL_TYPES:
        return MODEL_TYPES[config["model_type"]]
    if default == "clip_l" and config.get("hidden_act") == "gelu":
        return "clip_h"
    return default


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return None


def has_qk_norm(files) -> bool:
    return False
