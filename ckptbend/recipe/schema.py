"""The recipe schema, as data: the sections, their keys (`Param`: kind, default, hard bounds, the
original node's soft range), the selectors each section accepts. The reader and the canonical writer
walk these tables; nothing else knows a key's default or range.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from ..layouts import ARCHITECTURE_NAMES
from ..layouts.text_encoders import CLIP_ENCODERS, LARGE_ENCODERS
from ..runtime.defaults import (BEND_DEFAULTS, BEND_RANGES, SAG_DEFAULTS, SAG_RANGES, SLOTHFUL_DEFAULTS, SLOTHFUL_MODES,
                                SLOTHFUL_RANGES, SLOTHFUL_SIMPLE_EXPANDS, SLOTHFUL_SIMPLE_FIXED)

SCHEMA_VERSION = 1
MULTIPLIER_SECTIONS = ("unet.self", "unet.cross", "unet.temporal", "clip", "dit.joint", "dit.self", "dit.cross", "text")
DYNAMIC_SECTIONS = ("sag", "slothful", "bending")
SECTIONS = MULTIPLIER_SECTIONS + DYNAMIC_SECTIONS
TOP_LEVEL_KEYS = ("schema", "name", "description", "architecture")

# `architecture = "sdxl"` (or a list): the models a recipe's block labels are written for, and the
# detected architectures each name covers (each family's ARCHITECTURE_NAMES). Optional: a recipe without
# it applies anywhere.
ARCHITECTURES = ARCHITECTURE_NAMES

BLOCK_GROUPS = ("input", "middle", "output")
# Only the shape of a block label is checked: which labels exist depends on the checkpoint
# (SD 1.x has IN00-IN11 / OUT00-OUT11, SDXL IN00-IN08 / OUT00-OUT08); the planner checks existence.
BLOCK_LABEL = re.compile(r"(?:IN|OUT)[0-9]{2}|M00")
# Diffusion transformers: D = Flux/HunyuanVideo double block, S = single block, J = SD3 joint block,
# B = a block of a model with one kind (Wan, Qwen-Image, LTX-Video; Lumina 2 / Z-Image main layers), and
# Lumina 2 / Z-Image's refiners: N = noise (image), C = context (caption), R = SigLIP reference image.
# V = Wan VACE's blocks. docs/recipes.md lists them per model. DIT_BLOCK_KINDS orders labels of different kinds.
DIT_BLOCK_GROUPS = ("double", "single", "vace")
DIT_BLOCK_KINDS = "DSJBNCRV"
DIT_BLOCK_LABEL = re.compile(f"[{DIT_BLOCK_KINDS}][0-9]{{2,3}}")
STREAMS = ("image", "text", "video", "audio", "reference")   # LTX-2's two streams; Flux.3's reference images
NAME_SLUG = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
QK_WARN_PRODUCT = 4.0    # q·k above this multiplies attention logits enough to risk fp16 overflow


# --- the schema, as data ------------------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    """One recipe key: how to read it, its default, and its ranges."""
    name: str
    kind: str                                 # a key of _CHECKS below
    default: Any = None
    required: bool = False
    lo: float | None = None                   # hard bounds: always enforced
    hi: float | None = None
    open_lo: bool = False                     # True: lo itself is excluded
    open_hi: bool = False
    soft: tuple[float, float] | None = None   # the node's own range: enforced unless allow_out_of_range
    soft_label: str = "the node's range"
    choices: tuple[str, ...] = ()
    note: str = ""                            # appended to a hard-bound error


def _table(*params: Param) -> dict[str, Param]:
    return {p.name: p for p in params}


ARCHITECTURE = Param("architecture", "architectures", default=(), choices=tuple(ARCHITECTURES))

# Multiplier sections: one factor per key (ComfyUI: default 1.0, range 0.0-10.0), plus selectors.
MULTIPLY_KEYS = {
    "unet.self": ("q", "k", "v", "out"),
    "unet.cross": ("q", "k", "v", "out"),
    "unet.temporal": ("self_structural", "self_temporal", "cross_structural", "cross_temporal"),
    "clip": ("q", "k", "v", "out"),
    "dit.joint": ("q", "k", "v", "out"),
    "dit.self": ("q", "k", "v", "out"),
    "dit.cross": ("q", "k", "v", "out"),
    "text": ("q", "k", "v", "out"),
}
# Selectors, per section. A value of () (or None) selects everything.
UNET_BLOCKS = Param("blocks", "blocks", default=())           # block labels / group names
DIT_BLOCKS = Param("blocks", "dit_blocks", default=())
DEPTH = Param("depth", "index_list", default=())              # transformer index inside a block
STREAM = Param("stream", "choice", default=None, choices=STREAMS)   # one token stream (of a joint attention; LTX-2's)
CLIP_ENCODERS_PARAM = Param("encoders", "encoders", default=(), choices=CLIP_ENCODERS)
LARGE_ENCODERS_PARAM = Param("encoders", "encoders", default=(), choices=LARGE_ENCODERS)
SECTION_SELECTORS = {
    "unet.self": (UNET_BLOCKS, DEPTH),
    "unet.cross": (UNET_BLOCKS, DEPTH),
    "unet.temporal": (UNET_BLOCKS, DEPTH),
    "clip": (CLIP_ENCODERS_PARAM,),
    "dit.joint": (DIT_BLOCKS, STREAM),
    "dit.self": (DIT_BLOCKS, STREAM),
    "dit.cross": (DIT_BLOCKS, STREAM),
    "text": (LARGE_ENCODERS_PARAM,),
}
SELECTORS = ("blocks", "depth", "encoders", "stream")


def _factor(name: str) -> Param:
    return Param(name, "number", 1.0, lo=0.0, soft=(0.0, 10.0), soft_label="ComfyUI's range")


def multiply_params(section: str) -> dict[str, Param]:
    """The keys of one multiplier section, in canonical order: selectors, then factors."""
    return {**{p.name: p for p in SECTION_SELECTORS[section]},
            **_table(*map(_factor, MULTIPLY_KEYS[section]))}


# The sampling-time sections' defaults and the original nodes' ranges are the runtime's (runtime/defaults.py,
# which every companion carries); here they gain what a recipe adds: kinds, hard bounds, notes.

# Self-Attention Guidance (ComfyUI's SelfAttentionGuidance node).
SAG_PARAMS = _table(
    Param("scale", "number", SAG_DEFAULTS["scale"], soft=SAG_RANGES["scale"], soft_label="ComfyUI's range"),
    Param("blur_sigma", "number", SAG_DEFAULTS["blur_sigma"], lo=0.0, open_lo=True, soft=SAG_RANGES["blur_sigma"],
          soft_label="ComfyUI's range",
          note="ComfyUI's SAG produces NaN at blur_sigma 0; use a tiny positive value such as 0.01, "
               "or leave [sag] out"),
)


def _slothful(name: str) -> Param:
    default = SLOTHFUL_DEFAULTS[name]
    if isinstance(default, bool):
        return Param(name, "bool", default)
    if name.endswith("_mode"):
        return Param(name, "choice", default, choices=SLOTHFUL_MODES)
    lo = 0.0 if name in ("time_decay", "in_strength", "out_strength") else None
    return Param(name, "number", default, lo=lo, soft=SLOTHFUL_RANGES[name])


# Slothful Attention (Dec 2023 version). The Simple node's names map onto the full set.
SLOTHFUL_PARAMS = _table(*(_slothful(name) for name in (
    "time_decay", "keep_middle", "in_mode", "out_mode", "in_depth_decay", "out_depth_decay", "in_strength",
    "out_strength", "in_k_blend", "in_v_blend", "out_k_blend", "out_v_blend")))
SLOTHFUL_SIMPLE = Param("simple", "bool", False)
# Simple-node name → the full-node parameters it sets (keep_middle is fixed to true).
SIMPLE_EXPANDS = SLOTHFUL_SIMPLE_EXPANDS
SIMPLE_FIXED = SLOTHFUL_SIMPLE_FIXED
SLOTHFUL_SIMPLE_PARAMS = {simple: replace(SLOTHFUL_PARAMS[full[0]], name=simple)
                          for simple, full in SIMPLE_EXPANDS.items()}

# Attention Bending: fields every entry has, then each mode's own parameters.
BEND_MODES = ("scale", "spatial_scale", "rotate", "translate", "flip", "blur", "sharpen",
              "regional_mask", "frequency_filter")
BEND_COMMON = _table(
    Param("token", "text", required=True),
    Param("mode", "choice", required=True, choices=BEND_MODES),
    Param("strength", "number", BEND_DEFAULTS["strength"]),
    Param("apply_to_timesteps", "step_range", BEND_DEFAULTS["apply_to_timesteps"]),   # [start, end], both inclusive
    Param("apply_to_layers", "index_list", BEND_DEFAULTS["apply_to_layers"]),         # text-attention site indices
    Param("renormalize", "renormalize", BEND_DEFAULTS["renormalize"]),
)
_DOCUMENTED = {"soft_label": "the documented range"}
BEND_PARAMS = _table(
    Param("scale_factor", "number", BEND_DEFAULTS["scale_factor"]),
    Param("zoom_factor", "number", BEND_DEFAULTS["zoom_factor"], lo=0.0, open_lo=True),
    Param("angle", "number", BEND_DEFAULTS["angle"]),
    Param("translate_x", "number", BEND_DEFAULTS["translate_x"], soft=BEND_RANGES["translate_x"], **_DOCUMENTED),
    Param("translate_y", "number", BEND_DEFAULTS["translate_y"], soft=BEND_RANGES["translate_y"], **_DOCUMENTED),
    Param("flip_horizontal", "bool", BEND_DEFAULTS["flip_horizontal"]),
    Param("flip_vertical", "bool", BEND_DEFAULTS["flip_vertical"]),
    Param("sharpen_amount", "number", BEND_DEFAULTS["sharpen_amount"]),
    Param("kernel_size", "int", BEND_DEFAULTS["kernel_size"], lo=1),
    Param("sigma", "number", BEND_DEFAULTS["sigma"], lo=0.0, open_lo=True),
    Param("region", "region", BEND_DEFAULTS["region"]),   # [x1, y1, x2, y2] in 0-1, (0, 0) top-left; None = no-op
    Param("region_feather", "number", BEND_DEFAULTS["region_feather"], lo=0.0),
    Param("filter", "choice", BEND_DEFAULTS["filter"], choices=("lowpass", "highpass")),
    # Unset (None) in a recipe: the original's sigma placeholder unless a filter is named, then the runtime's default.
    Param("cutoff", "number", None, lo=0.0, open_lo=True, hi=1.0),
)
BEND_MODE_PARAMS = {
    "scale": ("scale_factor",),
    "spatial_scale": ("zoom_factor",),
    "rotate": ("angle",),
    "translate": ("translate_x", "translate_y"),
    "flip": ("flip_horizontal", "flip_vertical"),
    "blur": ("kernel_size", "sigma"),
    "sharpen": ("sharpen_amount", "kernel_size", "sigma"),
    "regional_mask": ("region", "region_feather"),
    "frequency_filter": ("sigma", "filter", "cutoff"),
}
RENORMALIZE = {True: "row", False: "none", "row": "row", "column": "column", "none": "none"}


def bend_params(mode: str) -> dict[str, Param]:
    """The keys of a [[bending]] entry of this mode, in canonical order."""
    return {**BEND_COMMON, **{name: BEND_PARAMS[name] for name in BEND_MODE_PARAMS[mode]}}
