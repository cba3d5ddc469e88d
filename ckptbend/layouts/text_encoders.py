"""Text encoders, as data: CLIP-L / CLIP-G (HF names), OpenCLIP ViT-H / ViT-bigG (OpenCLIP names, fused
in_proj), and the large encoders of DiT models: T5-XXL, UMT5-XXL (T5 names), Qwen2.5-VL-7B and Llama-3-8B
(HF decoder names).

A projection is found by key suffix, as ComfyUI's CLIPAttentionMultiply finds CLIP's; OpenCLIP's
fused `attn.in_proj_weight` / `in_proj_bias` hold q, k and v as three row ranges. None of these
encoders normalises q or k, so every factor scales projection rows (dit-layouts.md §11).
"""

from __future__ import annotations

import re
from collections import Counter

from .types import CheckpointFile, Identified, Site
from .validate import fused_width

CLIP_ENCODERS = ("clip_l", "clip_g", "clip_h")                   # the [clip] section (CLIPAttentionMultiply)
LARGE_ENCODERS = ("t5xxl", "umt5xxl", "qwen25_7b", "llama")      # the [text] section; ComfyUI's names
COMPONENTS = TEXT_ENCODERS = CLIP_ENCODERS + LARGE_ENCODERS
TEXT_ENCODER_WIDTHS = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}

HF_CLIP_SUFFIX = re.compile(r"(?:^|\.)self_attn\.(?P<proj>q_proj|k_proj|v_proj|out_proj)\.(?:weight|bias)$")
OPENCLIP_SUFFIX = re.compile(r"(?:^|\.)resblocks\.\d+\.attn\.(?P<proj>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$")
T5_SUFFIX = re.compile(r"(?:^|\.)encoder\.block\.\d+\.layer\.0\.SelfAttention\.(?P<proj>q|k|v|o)\.weight$")
# Decoder-only LLMs: the language model's layers only (Qwen2.5-VL's vision tower is `visual.blocks.N.attn`).
LLM_SUFFIX = re.compile(r"(?:^|\.)layers\.\d+\.self_attn\.(?P<proj>q_proj|k_proj|v_proj|o_proj)\.(?:weight|bias)$")
PROJ_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "out", "o_proj": "out",
              "out_proj.weight": "out", "out_proj.bias": "out", "q": "q", "k": "k", "v": "v", "o": "out"}
FUSED_ORDER = ("q", "k", "v")
SUFFIX_OF = {"clip_l": (HF_CLIP_SUFFIX, OPENCLIP_SUFFIX), "clip_g": (HF_CLIP_SUFFIX, OPENCLIP_SUFFIX),
             "clip_h": (HF_CLIP_SUFFIX, OPENCLIP_SUFFIX), "t5xxl": (T5_SUFFIX,), "umt5xxl": (T5_SUFFIX,),
             "qwen25_7b": (LLM_SUFFIX,), "llama": (LLM_SUFFIX,)}

# Parts a text encoder's file may hold besides the encoder's own layers, which no section reaches: a full
# T5's decoder, the vision tower of a vision-language model (LLaVA, Qwen2.5-VL) or of a full CLIP model.
NOT_THE_ENCODER = re.compile(r"(?:^|\.)(?P<part>decoder|vision_model|vision_tower|visual|multi_modal_projector)\.")
PART_NAMES = {"decoder": "decoder", "vision_model": "vision tower", "vision_tower": "vision tower",
              "visual": "vision tower", "multi_modal_projector": "vision projector"}

# ComfyUI's all-in-one files: `text_encoders.<name>.transformer.…` (DiT families use it for their files).
ALL_IN_ONE = re.compile(r"text_encoders\.(?P<name>" + "|".join(TEXT_ENCODERS) + r")\.")

# diffusers text-encoder folders, by the transformers model_type in their config.json.
MODEL_TYPES = {"t5": "t5xxl", "umt5": "umt5xxl", "qwen2_5_vl": "qwen25_7b", "llama": "llama", "llava": "llama"}
CLIP_MODEL_TYPES = ("clip_text_model", "clip")

# Text encoders live inside other families' files and folders, or alone (identify).
SINGLE_FILE_PREFIXES = ()
DIFFUSERS_PIPELINES = {}
ARCHITECTURE_NAMES = {}   # a file of text encoders has no block labels: `architecture` does not restrict it


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
            d = fused_width(files, cf, t.name)
            for i, proj in enumerate(FUSED_ORDER):
                found.append(Site(cf.rel, t.name, component, "self", proj, rows=(i * d, (i + 1) * d), fused=3 * d))
        else:
            found.append(Site(cf.rel, t.name, component, "self", PROJ_NAMES[m["proj"]]))
    return found


def set_aside(files: list[CheckpointFile]) -> tuple[list[CheckpointFile], tuple[str, ...]]:
    """The files with the keys of a text encoder that are not its own layers (NOT_THE_ENCODER) taken out of
    its component, so no section reaches them; and one line per part saying what is left alone."""
    out, counts = [], Counter()
    for f in files:
        aside = {n: m for n, c in f.components.items() if c in TEXT_ENCODERS and (m := NOT_THE_ENCODER.search(n))}
        counts.update((f.components[n], PART_NAMES[m["part"]], n[:m.end()]) for n, m in aside.items())
        out.append(CheckpointFile(f.rel, f.header, {n: c for n, c in f.components.items() if n not in aside})
                   if aside else f)
    notes = tuple(f"{n} tensors of {component}'s {part} ({where}…)" for (component, part, where), n in counts.items())
    return out, notes


def _large_kind(names) -> str | None:
    names = [n for n in names if not NOT_THE_ENCODER.search(n)]
    if any(T5_SUFFIX.search(n) for n in names):
        # UMT5 keeps a relative-position table in every block, T5 only in block 0.
        umt5 = any(n.endswith("encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight") for n in names)
        return "umt5xxl" if umt5 else "t5xxl"
    if any(LLM_SUFFIX.search(n) and n.endswith("o_proj.weight") for n in names):
        return "qwen25_7b" if any(n.endswith("self_attn.k_proj.bias") for n in names) else "llama"
    return None


def bare_kind(header) -> str | None:
    """Which text encoder a file saved alone holds, or None."""
    names = [n for n in header.names if not NOT_THE_ENCODER.search(n)]   # e.g. a CLIP vision tower alone: none
    if large := _large_kind(names):
        return large
    hf, openclip = any(HF_CLIP_SUFFIX.search(n) for n in names), any(OPENCLIP_SUFFIX.search(n) for n in names)
    if not (hf or openclip) or not any(n.endswith("token_embedding.weight") for n in names):
        return None   # a CLIP without a token embedding reads images: a vision tower saved alone
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
    """A file of text encoders only: one saved alone, or several under ComfyUI's `text_encoders.<name>.`."""
    by_prefix = {n: c for n in header.names if (c := all_in_one_component(n))}
    if by_prefix:
        names = "+".join(c for c in TEXT_ENCODERS if c in by_prefix.values())
        return Identified("text-encoder", f"{names}-only", by_prefix)
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


def folder_components(configs: dict[str, dict]) -> dict[str, str]:
    """The text-encoder sub-folders of a pipeline without a table, each told by its own config (sub-folder →
    config, in name order). transformers' model_type names the large encoders; a CLIP is named by its width
    where that is a released one, else by where pipelines put it: the second of two CLIPs, or a lone one in
    text_encoder_2 with no text_encoder (the SDXL refiner), is CLIP-G; a lone gelu one is OpenCLIP-H (SD 2.x);
    any other is CLIP-L. A sub-folder of another model_type is left out, so it is copied unchanged."""
    clips = [sub for sub, c in configs.items() if c.get("model_type") in CLIP_MODEL_TYPES]
    found = {sub: MODEL_TYPES[c["model_type"]] for sub, c in configs.items() if c.get("model_type") in MODEL_TYPES}
    for i, sub in enumerate(clips):
        config = configs[sub]
        if config.get("hidden_size") in TEXT_ENCODER_WIDTHS:
            found[sub] = TEXT_ENCODER_WIDTHS[config["hidden_size"]]
        elif i == 1 or (sub == "text_encoder_2" and "text_encoder" not in configs):
            found[sub] = "clip_g"
        else:
            found[sub] = "clip_h" if len(clips) == 1 and config.get("hidden_act") == "gelu" else "clip_l"
    return dict(sorted(found.items()))


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return None


def has_qk_norm(files) -> bool:
    return False
