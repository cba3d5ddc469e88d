"""Text encoders: CLIP-L / CLIP-G (HF names), OpenCLIP ViT-H / ViT-bigG (OpenCLIP names, fused in_proj), and
the large encoders of DiT models (text_encoder_forms.py: T5-XXL, UMT5-XXL, ByT5 in T5 names; Llama 3 / 3.1,
Mistral Small 3.x, Qwen2.5-VL, Qwen3, Qwen3-VL, Gemma 2, 3 and 4 in transformers' decoder names).

A projection is found by key suffix, as ComfyUI's CLIPAttentionMultiply finds CLIP's; OpenCLIP's
fused `attn.in_proj_weight` / `in_proj_bias` hold q, k and v as three row ranges. CLIP, T5 and the plain decoder
LLMs do not normalise q or k, so every factor scales projection rows; in Qwen3 and Gemma 3 / 4, q and k scale
their qk-norm weights, and in Gemma a norm over the attention output cancels v and out (docs/formats.md, "What
each factor scales in a large text encoder").
"""

from __future__ import annotations

import re
from collections import Counter

from ..errors import CkptbendError
from ..formats.comfy_quant import logical_shapes
from . import text_encoder_forms as forms
from .text_encoder_forms import LLM_SUFFIX, T5_SUFFIX
from .types import CheckpointFile, Identified, Site
from .validate import fused_width

CLIP_ENCODERS = ("clip_l", "clip_g", "clip_h")                   # the [clip] section (CLIPAttentionMultiply)
LARGE_ENCODERS = tuple(forms.LARGE)                              # the [text] section; ComfyUI's names
COMPONENTS = TEXT_ENCODERS = CLIP_ENCODERS + LARGE_ENCODERS
TEXT_ENCODER_WIDTHS = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}

HF_CLIP_SUFFIX = re.compile(r"(?:^|\.)self_attn\.(?P<proj>q_proj|k_proj|v_proj|out_proj)\.(?:weight|bias)$")
OPENCLIP_SUFFIX = re.compile(r"(?:^|\.)resblocks\.\d+\.attn\.(?P<proj>in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)$")
PROJ_NAMES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "out_proj": "out", "o_proj": "out",
              "out_proj.weight": "out", "out_proj.bias": "out", "q": "q", "k": "k", "v": "v", "o": "out",
              "q_norm": "q", "k_norm": "k"}
FUSED_ORDER = ("q", "k", "v")
SUFFIX_OF = {"clip_l": (HF_CLIP_SUFFIX, OPENCLIP_SUFFIX), "clip_g": (HF_CLIP_SUFFIX, OPENCLIP_SUFFIX),
             "clip_h": (HF_CLIP_SUFFIX, OPENCLIP_SUFFIX)} | {name: form.sites for name, form in forms.LARGE.items()}

# Parts a text encoder's file may hold besides the encoder's own layers, which no section reaches: a full
# T5's decoder, the vision tower of a vision-language model (LLaVA, Qwen2.5-VL, Qwen3-VL, Gemma 3, Mistral 3) or
# of a full CLIP model.
NOT_THE_ENCODER = re.compile(r"(?:^|\.)(?P<part>decoder|vision_model|vision_tower|visual|multi_modal_projector)\.")
PART_NAMES = {"decoder": "decoder", "vision_model": "vision tower", "vision_tower": "vision tower",
              "visual": "vision tower", "multi_modal_projector": "vision projector"}

# ComfyUI's all-in-one files: `text_encoders.<name>.transformer.…` (DiT families use it for their files).
ALL_IN_ONE = re.compile(r"text_encoders\.(?P<name>" + "|".join(TEXT_ENCODERS) + r")\.")

CLIP_MODEL_TYPES = ("clip_text_model", "clip")

# Decoder LLM files ckptbend refuses by name rather than take for an encoder it knows: (key suffix, why).
UNKNOWN_LLMS = (
    ("linear_attn.A_log", "a Qwen3.5 / Qwen3-Next text encoder (linear-attention layers), which ckptbend does not "
                          "bake yet"),
    ("self_attn.sinks", "a GPT-OSS text encoder (attention sinks), which ckptbend does not bake yet"),
    ("self_attn.qkv_proj.weight", "a decoder LLM with fused self_attn.qkv_proj, whose q/k/v rows depend on head "
                                  "counts the file does not hold; ckptbend bakes separate q_proj/k_proj/v_proj"),
)

# Text encoders live inside other families' files and folders, or alone (identify).
SINGLE_FILE_PREFIXES = ()
DIFFUSERS_PIPELINES = {}
ARCHITECTURE_NAMES = {}   # a file of text encoders has no block labels: `architecture` does not restrict it


def all_in_one_component(key: str) -> str | None:
    m = ALL_IN_ONE.match(key)
    return m["name"] if m else None


def sites(cf: CheckpointFile, files) -> list[Site]:
    """The text encoders' attention projections (and qk-norm weights) in one file."""
    found = []
    for t in cf.header.tensors:
        component = cf.components.get(t.name)
        name = forms.transformers_name(t.name)                        # a GGUF's llama.cpp names read as HF's
        m = next((m for pattern in SUFFIX_OF.get(component, ()) if (m := pattern.search(name))), None)
        if m is None:
            continue
        if m["proj"].startswith("in_proj"):
            # OpenCLIP's fused [3d, d] / [3d]: rows 0:d are q, d:2d k, 2d:3d v.
            d = fused_width(files, cf, t.name)
            for i, proj in enumerate(FUSED_ORDER):
                found.append(Site(cf.rel, t.name, component, "self", proj, rows=(i * d, (i + 1) * d), fused=3 * d))
        else:
            proj, form = PROJ_NAMES[m["proj"]], forms.LARGE.get(component)
            inert = form.inert if form and proj in ("v", "out") else None
            offset = form.norm_offset if form and m["proj"].endswith("_norm") else 0.0
            found.append(Site(cf.rel, t.name, component, "self", proj, inert=inert, offset=offset))
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


def _shapes(header) -> dict:
    """logical_shapes under transformers' names (text_encoder_forms.transformers_name)."""
    return {forms.transformers_name(n): shape for n, shape in logical_shapes(header).items()}


def _has(names, suffix: str) -> bool:
    return any(n.endswith(suffix) for n in names)


def _llm_kind(header, names) -> str:
    """A decoder LLM's encoder, told by its form as ComfyUI's detection tells it (post_feedforward_layernorm:
    Gemma, with layer_scalar Gemma 4; q_norm: Qwen3 / Gemma 3; q/k/v biases: Qwen2.5-VL; q_proj rows other than
    the width: Mistral 3 — Llama's q spans the width), then by width among one form's sizes."""
    for suffix, what in UNKNOWN_LLMS:
        if _has(names, suffix):
            raise CkptbendError(f"{header.path}: {what}; refusing")
    shapes = _shapes(header)
    q = next((n for n in names if n.endswith("self_attn.q_proj.weight")), None)
    norm = next((n for n in names if n.endswith("input_layernorm.weight")), None)
    width = shapes[q][1] if q else shapes[norm][0] if norm else None
    if _has(names, "post_feedforward_layernorm.weight"):
        if _has(names, "layer_scalar"):
            return forms.by_width("gemma4", width)
        return forms.by_width("gemma3", width) if _has(names, "self_attn.q_norm.weight") else "gemma2_2b"
    if _has(names, "self_attn.q_norm.weight"):
        # llama.cpp keeps Qwen3-VL's vision tower in a separate mmproj file: its GGUF says qwen3vl instead
        vision = (any(NOT_THE_ENCODER.search(n) for n in header.names)
                  or getattr(header, "architecture", None) == "qwen3vl")
        return forms.by_width("qwen3vl" if vision else "qwen3", width)
    if _has(names, "self_attn.k_proj.bias"):
        return "qwen25_7b"
    return "llama" if q is None or shapes[q][0] == width else forms.by_width("mistral3", width)


def _t5_kind(header, names) -> str:
    """UMT5 keeps a relative-position table in every block, T5 only in block 0; ByT5's q is narrower than its
    width (text_encoder_forms.is_byt5)."""
    if _has(names, "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"):
        return "umt5xxl"
    q = next(n for n in names if n.endswith("SelfAttention.q.weight"))
    return "byt5_small" if forms.is_byt5(*_shapes(header)[q]) else "t5xxl"


def _large_kind(header, names) -> str | None:
    names = [n for n in names if not NOT_THE_ENCODER.search(n)]
    if any(T5_SUFFIX.search(n) for n in names):
        return _t5_kind(header, names)
    if any(LLM_SUFFIX.search(n) and n.endswith("o_proj.weight") for n in names):
        return _llm_kind(header, names)
    return None


def bare_kind(header) -> str | None:
    """Which text encoder a file saved alone holds, or None."""
    names = [forms.transformers_name(n) for n in header.names]
    names = [n for n in names if not NOT_THE_ENCODER.search(n)]   # e.g. a CLIP vision tower alone: none
    if large := _large_kind(header, names):
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
    (SD 2.x's text_encoder is OpenCLIP-H in HF names: told from CLIP-L by its activation; a large encoder's
    size by its width)."""
    if kind := forms.of_config(config):
        return kind
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
    found = {sub: kind for sub, c in configs.items() if (kind := forms.of_config(c))}
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


def scales(component: str) -> str | None:
    """What [text] q/k and v/out reach in an encoder where that is not simply its projections (for inspect)."""
    form = forms.LARGE.get(component)
    if form is None:
        return None
    notes = ["q/k scale the q_norm/k_norm weights" + (", used as 1 + w" if form.norm_offset else "")
             ] if forms.LLM_QK_NORM in form.sites else []
    notes += [f"v/out cancelled by {'v_norm and ' if form is forms.GEMMA4 else ''}post_attention_layernorm"
              ] if form.inert else []
    return "; ".join(notes) or None


def has_qk_norm(files) -> bool:
    return False
