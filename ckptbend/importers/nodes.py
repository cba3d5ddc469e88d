"""The ComfyUI nodes an import understands, as data: what each one means for a recipe, and the order
of its widgets (a UI-format workflow stores widget values by position only).

Facts read from the node definitions (Comfy-Org/ComfyUI: nodes.py, comfy_extras/
nodes_attention_multiply.py, nodes_sag.py, nodes_custom_sampler.py, nodes_video_model.py;
MitoshiroPJ/comfyui_slothful_attention at 7cab5f3 (Dec 2023) and f297558 (later)). Widget order is
the order of the node's non-link inputs; an INT input with `control_after_generate` is followed by
one more value in `widgets_values` (the frontend's "fixed"/"randomize" control), written CONTROL here.
"""

from __future__ import annotations

from dataclasses import dataclass

CONTROL = "control_after_generate"   # a frontend-only widget value; never an input of the node


@dataclass(frozen=True)
class Patch:
    """A node that changes the model (or CLIP) in a way a recipe section expresses."""
    section: str                 # recipe section it becomes
    through: str                 # the input it patches: "model" or "clip"
    keys: tuple[str, ...]        # inputs that become the section's keys, same names
    simple: bool = False         # Slothful Attention Simple: the section gets simple = true


_QKVO = ("q", "k", "v", "out")
SLOTHFUL_KEYS = ("time_decay", "keep_middle", "in_mode", "in_depth_decay", "in_strength", "in_k_blend",
                 "in_v_blend", "out_mode", "out_depth_decay", "out_strength", "out_k_blend", "out_v_blend")
SLOTHFUL_SIMPLE_KEYS = ("time_decay", "depth_decay", "in_mode", "in_strength", "in_blend",
                        "out_mode", "out_strength", "out_blend")

PATCHES = {
    "UNetSelfAttentionMultiply": Patch("unet.self", "model", _QKVO),
    "UNetCrossAttentionMultiply": Patch("unet.cross", "model", _QKVO),
    "UNetTemporalAttentionMultiply": Patch("unet.temporal", "model",
                                           ("self_structural", "self_temporal", "cross_structural", "cross_temporal")),
    "CLIPAttentionMultiply": Patch("clip", "clip", _QKVO),
    "SelfAttentionGuidance": Patch("sag", "model", ("scale", "blur_sigma")),
    "SlothfulAttention": Patch("slothful", "model", SLOTHFUL_KEYS),
    "SlothfulAttentionSimple": Patch("slothful", "model", SLOTHFUL_SIMPLE_KEYS, simple=True),
}

# The later SlothfulAttention (f297558) keeps the class name but computes its stride differently:
# a bell curve in time around peak_time instead of t^time_decay, depth as (1/depth)^depth_decay instead
# of r^(depth_decay/2), no keep_middle (the middle block is always skipped), and in_slothful/out_slothful
# for strength (applied to the opposite blocks). Only the modes and the k/v blends mean the same, so
# the node cannot become [slothful]; these inputs identify it.
SLOTHFUL_LATER_KEYS = ("peak_time", "time_decay", "in_mode", "in_depth_decay", "in_slothful", "in_k_blend",
                       "in_v_blend", "out_mode", "out_depth_decay", "out_slothful", "out_k_blend", "out_v_blend")
SLOTHFUL_LATER_MARKS = ("peak_time", "in_slothful", "out_slothful")

# Loaders: where the model and CLIP come from; the inputs that name the files.
LOADERS = {
    "CheckpointLoaderSimple": ("ckpt_name",),
    "CheckpointLoader": ("ckpt_name",),
    "unCLIPCheckpointLoader": ("ckpt_name",),
    "ImageOnlyCheckpointLoader": ("ckpt_name",),
    "UNETLoader": ("unet_name",),
    "CLIPLoader": ("clip_name",),
    "DualCLIPLoader": ("clip_name1", "clip_name2"),
}


@dataclass(frozen=True)
class Sampler:
    model: str | None                 # the MODEL input (None: it takes a guider)
    conditioning: tuple[str, ...]     # CONDITIONING inputs
    cfg: str | None = None            # the CFG scale input, if any
    guider: str | None = None         # the GUIDER input (SamplerCustomAdvanced)


SAMPLERS = {
    "KSampler": Sampler("model", ("positive", "negative"), "cfg"),
    "KSamplerAdvanced": Sampler("model", ("positive", "negative"), "cfg"),
    "SamplerCustom": Sampler("model", ("positive", "negative"), "cfg"),
    "SamplerCustomAdvanced": Sampler(None, (), guider="guider"),
}
GUIDERS = {
    "CFGGuider": Sampler("model", ("positive", "negative"), "cfg"),
    "BasicGuider": Sampler("model", ("conditioning",)),
    "DualCFGGuider": Sampler("model", ("cond1", "cond2", "negative"), "cfg_conds"),
}

# Nodes that only pass a value along, with no effect of their own.
REROUTES = ("Reroute",)
PRIMITIVES = ("PrimitiveNode",)          # frontend-only: holds a widget value feeding converted widget inputs
VALUES = ("PrimitiveFloat", "PrimitiveInt", "PrimitiveBoolean", "PrimitiveString", "PrimitiveStringMultiline")
NOT_EXECUTED = ("Note", "MarkdownNote")  # frontend-only

# Widget order of each node whose values an import reads (UI format). A class with several entries
# existed in several versions; the one whose value kinds fit the node's values is used.
_F, _B, _S, _I = float, bool, str, int
WIDGETS: dict[str, tuple[tuple[tuple[str, type], ...], ...]] = {
    **{cls: (tuple((k, _F) for k in p.keys),) for cls, p in PATCHES.items()
       if cls not in ("SlothfulAttention", "SlothfulAttentionSimple")},
    "SlothfulAttention": (
        tuple((k, _B if k == "keep_middle" else _S if k.endswith("_mode") else _F) for k in SLOTHFUL_KEYS),
        tuple((k, _S if k.endswith("_mode") else _F) for k in SLOTHFUL_LATER_KEYS),
    ),
    "SlothfulAttentionSimple": (tuple((k, _S if k.endswith("_mode") else _F) for k in SLOTHFUL_SIMPLE_KEYS),),
    "PrimitiveFloat": ((("value", _F),),),       # backend value nodes: their one input "value"
    "PrimitiveInt": ((("value", _I), (CONTROL, _S)),),
    "PrimitiveBoolean": ((("value", _B),),),
    "PrimitiveString": ((("value", _S),),),
    "PrimitiveStringMultiline": ((("value", _S),),),
    "CheckpointLoaderSimple": ((("ckpt_name", _S),),),
    "CheckpointLoader": ((("config_name", _S), ("ckpt_name", _S)),),
    "unCLIPCheckpointLoader": ((("ckpt_name", _S),),),
    "ImageOnlyCheckpointLoader": ((("ckpt_name", _S),),),
    "UNETLoader": ((("unet_name", _S), ("weight_dtype", _S)),),
    "CLIPLoader": ((("clip_name", _S), ("type", _S), ("device", _S)),),
    "DualCLIPLoader": ((("clip_name1", _S), ("clip_name2", _S), ("type", _S), ("device", _S)),),
    "KSampler": ((("seed", _I), (CONTROL, _S), ("steps", _I), ("cfg", _F), ("sampler_name", _S),
                  ("scheduler", _S), ("denoise", _F)),),
    "KSamplerAdvanced": ((("add_noise", _S), ("noise_seed", _I), (CONTROL, _S), ("steps", _I), ("cfg", _F),
                          ("sampler_name", _S), ("scheduler", _S), ("start_at_step", _I), ("end_at_step", _I),
                          ("return_with_leftover_noise", _S)),),
    "SamplerCustom": ((("add_noise", _B), ("noise_seed", _I), (CONTROL, _S), ("cfg", _F)),),
    "CFGGuider": ((("cfg", _F),),),
    "DualCFGGuider": ((("cfg_conds", _F), ("cfg_cond2_negative", _F), ("style", _S)),),
}
