"""What a CLIPAttentionMultiply node does, as recipe sections. ComfyUI's node scales all four attention
projections of the CLIP encoders (a recipe's [clip]) and q, k, v of a decoder LLM text encoder
(HunyuanVideo's and HiDream's Llama, Qwen-Image's Qwen2.5-VL, Flux.2's Mistral, Lumina 2's Gemma 2: a
recipe's [text] with `encoders`, q/k/v only: the LLM's output projection is named o_proj, which the node's
key pattern misses); T5, UMT5 and ByT5 are untouched. In an LLM with qk-norm (Qwen3, Qwen3-VL, Gemma 3,
Gemma 4) the node's q and k land on q_proj / k_proj, where the norm cancels them: only its v is imported (a
recipe's [text] q/k would scale the norm weights, which does act). Which encoders the CLIP holds is read
from its loader's file names (nodes.ENCODER_FILES).
"""

from __future__ import annotations

import re
from pathlib import PurePath

from ckptbend.errors import CkptbendError
from ckptbend.layouts.text_encoder_forms import LARGE, LLM_QK_NORM

from . import nodes as N
from .workflow import Node


def encoder_kind(file_name: str) -> str | None:
    name = PurePath(file_name.replace("\\", "/")).name.lower()
    return next((kind for pattern, kind in N.ENCODER_FILES if re.search(pattern, name)), None)


def loaded_encoders(loader: Node | None) -> dict[str, str] | None:
    """{file name: encoder kind (None: not known)} of a text-encoder loader; None for a checkpoint's
    own CLIP or a loader ckptbend does not know."""
    if loader is None or loader.class_type in N.CHECKPOINT_LOADERS or loader.class_type not in N.LOADERS:
        return None
    files = [v for k in N.LOADERS[loader.class_type] if isinstance(v := loader.inputs.get(k), str) and v]
    if loader.class_type == "LTXAVTextEncoderLoader":
        files = files[:1]                      # its ckpt_name only supplies LTX-2's connector weights
    return {f: encoder_kind(f) for f in files}


def clip_multiply(node: Node, values: dict, loader: Node | None, source: str) -> tuple[list[tuple], list[str]]:
    """([(section, values, comment), ...], notes) for one CLIPAttentionMultiply node."""
    qkv = {k: values[k] for k in ("q", "k", "v")}
    changes_qkv = any(v != 1 for v in qkv.values())
    files = loaded_encoders(loader)
    if files is None:
        notes = []
        if changes_qkv:
            where = f"{loader} (its checkpoint's own CLIP)" if loader and loader.class_type in N.CHECKPOINT_LOADERS \
                else f"{loader} (a loader ckptbend does not know)" if loader else "an unknown loader"
            notes.append(f"{node}: the CLIP comes from {where}; if it also holds an LLM text encoder (HunyuanVideo's "
                         "Llama, Qwen-Image's Qwen2.5-VL), ComfyUI's node scales that encoder's q, k and v too: add "
                         "[[text]] with those encoders and q, k, v")
        return [("clip", values, str(node))], notes
    unknown = [f for f, kind in files.items() if kind is None]
    foreign = [f for f, kind in files.items() if kind == "llm"]
    if changes_qkv and (unknown or foreign):
        what = (f"the LLM text encoder {foreign[0]!r}, which a recipe's [text] cannot reach (it knows T5, UMT5, "
                "Qwen2.5-VL 7B, Llama 3 8B, Mistral Small 3, Qwen3, Qwen3-VL, Gemma 2 2B, Gemma 3 and Gemma 4)") \
            if foreign else \
            f"{unknown[0]!r} if it is an LLM text encoder, and ckptbend cannot tell from its name which encoder it is"
        raise CkptbendError(f"{source}: {node} (q {qkv['q']:g}, k {qkv['k']:g}, v {qkv['v']:g}) also scales the "
                            f"q, k and v of {what}")
    kinds = set(files.values())
    sections = []
    if kinds & set(N.CLIP_KINDS) or unknown:
        sections.append(("clip", values, str(node)))
    llms = [k for k in N.LLM_KINDS if k in kinds]
    plain = [k for k in llms if LLM_QK_NORM not in LARGE[k].sites]
    normed = [k for k in llms if LLM_QK_NORM in LARGE[k].sites]
    if plain and changes_qkv:
        sections.append(("text", {"encoders": plain, **qkv},
                         f"{node}: its q, k, v on {', '.join(plain)} (ComfyUI's node leaves an LLM's o_proj alone)"))
    if normed and qkv["v"] != 1:
        sections.append(("text", {"encoders": normed, "v": qkv["v"]},
                         f"{node}: its v on {', '.join(normed)} (its q, k land on q_proj / k_proj, cancelled by the "
                         "qk-norm)"))
    notes = [] if sections else [f"{node} changes nothing here: ComfyUI's node patches CLIP encoders and LLMs' q, k, "
                                 f"v, and {loader} loads {', '.join(sorted(kinds))} only"]
    if normed and (qkv["q"] != 1 or qkv["k"] != 1):
        notes.append(f"{node}: its q {qkv['q']:g} / k {qkv['k']:g} on {', '.join(normed)} scale q_proj / k_proj, "
                     "whose qk-norm cancels them, as in ComfyUI: not imported ([text] q/k scale the norm weights, "
                     "which acts)")
    return sections, notes
