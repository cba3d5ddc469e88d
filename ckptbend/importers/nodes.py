"""The ComfyUI nodes an import understands, as data: what each one means for a recipe, and the order
of its widgets (a UI-format workflow stores widget values by position only).

Facts read from the node definitions (Comfy-Org/ComfyUI: nodes.py, comfy_extras/
nodes_attention_multiply.py, nodes_sag.py, nodes_custom_sampler.py, nodes_video_model.py, nodes_logic.py,
nodes_lt.py; MitoshiroPJ/comfyui_slothful_attention at 7cab5f3 (Dec 2023) and f297558 (later)). Widget order is
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

# Loaders the notes name files for: the inputs that name the files. Any node without a MODEL (or CLIP)
# input ends a walk as a loader; those not listed here are named as loaders ckptbend does not know.
CHECKPOINT_LOADERS = {
    "CheckpointLoaderSimple": ("ckpt_name",),
    "CheckpointLoader": ("ckpt_name",),
    "unCLIPCheckpointLoader": ("ckpt_name",),
    "ImageOnlyCheckpointLoader": ("ckpt_name",),
}
LOADERS = {
    **CHECKPOINT_LOADERS,
    "UNETLoader": ("unet_name",),
    "UnetLoaderGGUF": ("unet_name",),                      # city96/ComfyUI-GGUF
    "CLIPLoader": ("clip_name",),
    "DualCLIPLoader": ("clip_name1", "clip_name2"),
    "TripleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3"),
    "QuadrupleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3", "clip_name4"),
    "CLIPLoaderGGUF": ("clip_name",),
    "DualCLIPLoaderGGUF": ("clip_name1", "clip_name2"),
    "TripleCLIPLoaderGGUF": ("clip_name1", "clip_name2", "clip_name3"),
    "QuadrupleCLIPLoaderGGUF": ("clip_name1", "clip_name2", "clip_name3", "clip_name4"),
    "LTXAVTextEncoderLoader": ("text_encoder", "ckpt_name"),
}

# Nodes that change how the model is sampled or run, not its weights or attention maps: a recipe holds
# nothing of theirs, the baked model needs them as much as the original did, and they stay in the
# workflow. On the model path: sigma schedules, CFG functions, denoise masks, guidance by skipped
# layers, caches and the attention backend; on the CLIP path: the layer read and tokenizer options.
SAMPLING_ONLY = {
    "model": ("ModelSamplingDiscrete", "ModelSamplingContinuousEDM", "ModelSamplingContinuousV",
              "ModelSamplingStableCascade", "ModelSamplingSD3", "ModelSamplingAuraFlow", "ModelSamplingFlux",
              "ModelSamplingLTXV", "CFGNorm", "CFGZeroStar", "RescaleCFG", "DifferentialDiffusion",
              "TemporalScoreRescaling", "VideoLinearCFGGuidance", "VideoTriangleCFGGuidance",
              "LatentApplyOperationCFG", "SkipLayerGuidanceDiT", "SkipLayerGuidanceDiTSimple",
              "SkipLayerGuidanceSD3", "ModelAttentionBackend", "EasyCache", "LazyCache", "FreeU", "FreeU_V2"),
    "clip": ("CLIPSetLastLayer", "T5TokenizerOptions"),
}

SWITCHES = ("ComfySwitchNode",)     # passes on on_true if its `switch` is true, else on_false (lazily)
ZEROED = ("ConditioningZeroOut",)   # zeroes the conditioning: the CLIP it was encoded with does not matter

# CLIPAttentionMultiply patches every key of the CLIP object ending in self_attn.{q,k,v,out}_proj (checked
# on ComfyUI 0.3.64's own text-encoder classes): all four projections of CLIP-L/G/H; q, k and v of a
# decoder LLM (its output projection is o_proj); nothing of T5, UMT5 or ByT5. Which encoder a loader
# loads is read from the file name ComfyUI's templates and model pages give it; first match wins.
ENCODER_FILES = (
    (r"umt5", "umt5xxl"),
    (r"byt5|t5", "t5"),
    (r"clip[_-]?l\b|clip[_-]?l[_-]|vit[_-]?l", "clip_l"),
    (r"clip[_-]?g\b|clip[_-]?g[_-]|bigg", "clip_g"),
    (r"clip[_-]?h\b|clip[_-]?h[_-]|vit[_-]?h", "clip_h"),
    (r"qwen[_.-]?2[._]?5[_.-]?vl[_.-]?7b|qwen25[_.-]?7b", "qwen25_7b"),
    (r"llava[_.-]?llama[_.-]?3|llama[_.-]?3(\.1)?[_.-]?8b", "llama"),
    (r"mistral[_.-]?3[_.-]?small|mistral[_.-]?small[_.-]?3", "mistral3_24b"),   # mistral_3_small_flux2_*
    (r"ministral[_.-]?3[_.-]?3b", "ministral3_3b"),
    (r"qwen[_.-]?3[_.-]?vl[_.-]?4b", "qwen3vl_4b"),
    (r"qwen[_.-]?3[_.-]?vl[_.-]?8b", "qwen3vl_8b"),
    (r"qwen[_.-]?3[_.-]?vl[_.-]?32b", "qwen3vl_32b"),
    (r"qwen[_.-]?3[_.-]?4b", "qwen3_4b"),
    (r"qwen[_.-]?3[_.-]?8b", "qwen3_8b"),
    (r"qwen[_.-]?3[_.-]?0?6b", "qwen3_06b"),
    (r"gemma[_.-]?2[_.-]?2b", "gemma2_2b"),
    (r"gemma[_.-]?3[_.-]?12b", "gemma3_12b"),
    (r"gemma[_.-]?3[_.-]?4b", "gemma3_4b"),
    (r"gemma[_.-]?4[_.-]?12b", "gemma4_12b"),
    (r"gemma[_.-]?4[_.-]?e4b", "gemma4_e4b"),
    (r"gemma[_.-]?4[_.-]?e2b", "gemma4_e2b"),
    (r"gemma[_.-]?4[_.-]?31b", "gemma4_31b"),
    (r"qwen|gemma|mistral|llama|olmo|phi|glm", "llm"),       # an LLM the [text] section does not know
)
CLIP_KINDS = ("clip_l", "clip_g", "clip_h")
LLM_KINDS = ("qwen25_7b", "llama", "mistral3_24b", "ministral3_3b", "qwen3_06b", "qwen3_4b", "qwen3_8b",
             "qwen3vl_4b", "qwen3vl_8b", "qwen3vl_32b", "gemma2_2b", "gemma3_4b", "gemma3_12b", "gemma4_e2b",
             "gemma4_e4b", "gemma4_12b", "gemma4_31b")                                  # [text]'s LLMs

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
    "LTXVDualCFGGuider": Sampler("model", ("positive", "negative"), "video_cfg"),
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
    "TripleCLIPLoader": ((("clip_name1", _S), ("clip_name2", _S), ("clip_name3", _S)),),
    "QuadrupleCLIPLoader": ((("clip_name1", _S), ("clip_name2", _S), ("clip_name3", _S), ("clip_name4", _S)),),
    "LTXAVTextEncoderLoader": ((("text_encoder", _S), ("ckpt_name", _S)),),
    "UnetLoaderGGUF": ((("unet_name", _S),),),
    "CLIPLoaderGGUF": ((("clip_name", _S), ("type", _S)),),
    "DualCLIPLoaderGGUF": ((("clip_name1", _S), ("clip_name2", _S), ("type", _S)),),
    "ComfySwitchNode": ((("switch", _B),),),
    "KSampler": ((("seed", _I), (CONTROL, _S), ("steps", _I), ("cfg", _F), ("sampler_name", _S),
                  ("scheduler", _S), ("denoise", _F)),),
    "KSamplerAdvanced": ((("add_noise", _S), ("noise_seed", _I), (CONTROL, _S), ("steps", _I), ("cfg", _F),
                          ("sampler_name", _S), ("scheduler", _S), ("start_at_step", _I), ("end_at_step", _I),
                          ("return_with_leftover_noise", _S)),),
    "SamplerCustom": ((("add_noise", _B), ("noise_seed", _I), (CONTROL, _S), ("cfg", _F)),),
    "CFGGuider": ((("cfg", _F),),),
    "DualCFGGuider": ((("cfg_conds", _F), ("cfg_cond2_negative", _F), ("style", _S)),),
    "LTXVDualCFGGuider": ((("video_cfg", _F), ("audio_cfg", _F)),),
}
