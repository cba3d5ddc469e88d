"""Text encoders as data: the encoders ckptbend knows (ComfyUI's names for them), the form each one's file has,
and what a factor scales in that form. text_encoders.py reads it.

Forms (docs/formats.md, "What each factor scales in a large text encoder"; the decoder LLMs' keys are
transformers' `layers.N.self_attn.*`, with or without `model.`, `model.language_model.` or
`language_model.model.` in front):

- T5 (T5-XXL, UMT5-XXL, ByT5): `encoder.block.N.layer.0.SelfAttention.{q,k,v,o}`, no biases, no qk-norm.
- Decoder LLM (Llama 3 / 3.1, Mistral Small 3.x, Ministral 3, Qwen2.5-VL): `{q,k,v,o}_proj`, q/k/v biases in
  Qwen2.5-VL; no qk-norm, so every factor scales its projection.
- Qwen3, Qwen3-VL: a per-head RMSNorm on q and on k after the projection (`q_norm`, `k_norm`, weight [head_dim],
  shared by all heads): a factor on `q_proj`/`k_proj` would be cancelled, so q and k scale the norm weights.
- Gemma 2: as a decoder LLM, plus an RMSNorm over every attention output (`post_attention_layernorm`, applied to
  `o_proj`'s output before the residual): v and out are cancelled by it.
- Gemma 3: Gemma 2's form with qk-norm whose stored weight w acts as (1 + w): q and k scale (1 + w), written back
  as f·(1 + w) − 1 (`Form.norm_offset`).
- Gemma 4 (`layer_scalar` in every layer): Gemma 2's form with a plain qk-norm (w acts as w) and v normalised
  too (`v_norm`, no weight): q and k scale the norm weights, v and out are cancelled. Its global layers may take
  v from k_proj (before k_norm: a k factor leaves v alone), and its last layers may reuse an earlier layer's k/v
  (their own k weights unused): a factor on every layer's k still scales every key once.
GQA (fewer k/v heads than q heads) changes no range: each projection is a tensor of its own, scaled whole.

Name forms: transformers' names above, or llama.cpp's (GGUF text encoders, LLAMA_CPP: read as transformers'
names, so every rule above applies to them unchanged). llama.cpp permutes Llama's q/k rows for its RoPE; a
factor scales a whole tensor, so the order of its rows does not matter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

T5_SUFFIX = re.compile(r"(?:^|\.)encoder\.block\.\d+\.layer\.0\.SelfAttention\.(?P<proj>q|k|v|o)\.weight$")
# Decoder-only LLMs: the language model's layers only (Qwen2.5-VL's vision tower is `visual.blocks.N.attn`).
LLM_SUFFIX = re.compile(r"(?:^|\.)layers\.\d+\.self_attn\.(?P<proj>q_proj|k_proj|v_proj|o_proj)\.(?:weight|bias)$")
LLM_VO_SUFFIX = re.compile(r"(?:^|\.)layers\.\d+\.self_attn\.(?P<proj>v_proj|o_proj)\.(?:weight|bias)$")
LLM_QK_NORM = re.compile(r"(?:^|\.)layers\.\d+\.self_attn\.(?P<proj>q_norm|k_norm)\.weight$")

# llama.cpp's tensor names (gguf-py's TensorNameMap for t5encoder, llama, qwen2vl, qwen3, qwen3vl) → the
# transformers names that mean the same tensor; a name neither matches keeps its own.
LLAMA_CPP = tuple((re.compile(p), r) for p, r in (
    (r"^enc\.blk\.(\d+)\.attn_(q|k|v|o)\.", r"encoder.block.\1.layer.0.SelfAttention.\2."),
    (r"^enc\.blk\.(\d+)\.attn_rel_b\.", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias."),
    (r"^blk\.(\d+)\.attn_(q|k|v)\.", r"model.layers.\1.self_attn.\2_proj."),
    (r"^blk\.(\d+)\.attn_output\.", r"model.layers.\1.self_attn.o_proj."),
    (r"^blk\.(\d+)\.attn_(q|k)_norm\.", r"model.layers.\1.self_attn.\2_norm."),
    (r"^blk\.(\d+)\.attn_norm\.", r"model.layers.\1.input_layernorm."),
))


def transformers_name(name: str) -> str:
    """A tensor's transformers name: llama.cpp's names translated (LLAMA_CPP), any other kept."""
    for pattern, replacement in LLAMA_CPP:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


GEMMA_CANCELS = ("Gemma's post_attention_layernorm normalises every attention output (o_proj's output) before "
                 "the residual, which cancels a factor on v or out")
GEMMA4_CANCELS = ("Gemma 4 normalises v (v_norm) and every attention output (post_attention_layernorm), which "
                  "cancels a factor on v or out")


@dataclass(frozen=True)
class Form:
    sites: tuple[re.Pattern, ...]      # key suffixes; group `proj` names the projection (or qk-norm)
    inert: str | None = None           # why a v or out factor cannot change the output, or None
    norm_offset: float = 0.0           # a qk-norm weight w acts as (w + norm_offset)


T5 = Form((T5_SUFFIX,))
LLM = Form((LLM_SUFFIX,))
QK_NORM = Form((LLM_QK_NORM, LLM_VO_SUFFIX))
GEMMA2 = Form((LLM_SUFFIX,), inert=GEMMA_CANCELS)
GEMMA3 = Form((LLM_QK_NORM, LLM_VO_SUFFIX), inert=GEMMA_CANCELS, norm_offset=1.0)
GEMMA4 = Form((LLM_QK_NORM, LLM_VO_SUFFIX), inert=GEMMA4_CANCELS)

# The [text] section's encoders, by ComfyUI's name (its all-in-one prefix `text_encoders.<name>.`), and their forms.
LARGE = {
    "t5xxl": T5, "umt5xxl": T5, "qwen25_7b": LLM, "llama": LLM,
    "byt5_small": T5,                                                    # HunyuanVideo 1.5 / HunyuanImage glyphs
    "mistral3_24b": LLM, "ministral3_3b": LLM,                           # Flux.2 dev; Ernie-Image
    "qwen3_06b": QK_NORM, "qwen3_2b": QK_NORM, "qwen3_4b": QK_NORM, "qwen3_8b": QK_NORM,   # Z-Image, Flux.2 klein
    "qwen3vl_4b": QK_NORM, "qwen3vl_8b": QK_NORM, "qwen3vl_32b": QK_NORM,    # Flux.3 klein, Qwen-Image 2.1, MiniMax H3
    "gemma2_2b": GEMMA2,                                                 # Lumina 2
    "gemma3_4b": GEMMA3, "gemma3_12b": GEMMA3,                           # NewBie; LTX-2
    "gemma4_e2b": GEMMA4, "gemma4_e4b": GEMMA4, "gemma4_12b": GEMMA4, "gemma4_31b": GEMMA4,   # LTX-2.5 (12B)
}

# Encoders of one form told apart by their width (the hidden size, as ComfyUI's detection tells them); another
# width (a tiny test model, a size ComfyUI does not ship) takes the first name.
BY_WIDTH = {
    "qwen3": {2560: "qwen3_4b", 4096: "qwen3_8b", 1024: "qwen3_06b", 2048: "qwen3_2b"},
    "qwen3vl": {2560: "qwen3vl_4b", 4096: "qwen3vl_8b", 5120: "qwen3vl_32b"},
    "gemma3": {3840: "gemma3_12b", 2560: "gemma3_4b"},
    "gemma4": {3840: "gemma4_12b", 2560: "gemma4_e4b", 1536: "gemma4_e2b", 5376: "gemma4_31b"},
    "mistral3": {5120: "mistral3_24b", 3072: "ministral3_3b"},
}

# diffusers text-encoder folders, by the transformers model_type in their config.json: a name, or a BY_WIDTH form
# (the width read from the config, or its text_config). T5's model_type also covers ByT5 (`byt5`).
MODEL_TYPES = {"t5": "t5", "umt5": "umt5xxl", "qwen2_5_vl": "qwen25_7b", "qwen2_5_vl_text": "qwen25_7b",
               "llama": "llama", "llava": "llama",
               "mistral3": "mistral3", "mistral": "mistral3", "ministral3": "mistral3", "qwen3": "qwen3",
               "qwen3_vl": "qwen3vl", "qwen3_vl_text": "qwen3vl", "gemma2": "gemma2_2b", "gemma3": "gemma3",
               "gemma3_text": "gemma3", "gemma4": "gemma4", "gemma4_text": "gemma4", "gemma4_unified": "gemma4",
               "gemma4_unified_text": "gemma4"}

# ByT5 is told from T5 by its attention width: every ByT5 size projects its wide model width (small: 1472) to
# fewer q/k/v rows (small: 6 heads × 64 = 384, ComfyUI's own test), where T5 and UMT5 keep heads × 64 = width.
def is_byt5(attention_rows, width) -> bool:
    return attention_rows != width


def by_width(form: str, width) -> str:
    names = BY_WIDTH[form]
    return names.get(width, next(iter(names.values())))


def of_config(config: dict) -> str | None:
    """The encoder a transformers config.json describes, or None for a model_type ckptbend does not know."""
    kind = MODEL_TYPES.get(config.get("model_type"))
    if kind == "t5":
        # (transformers' T5Config defaults where a key is missing: 8 heads × 64 = 512 wide)
        rows, width = config.get("num_heads", 8) * config.get("d_kv", 64), config.get("d_model", 512)
        return "byt5_small" if is_byt5(rows, width) else "t5xxl"
    if kind in BY_WIDTH:
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
        return by_width(kind, config.get("hidden_size", text.get("hidden_size")))
    return kind
