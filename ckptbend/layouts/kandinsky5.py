"""Kandinsky 5 (Lite image / video, Pro video; diffusers `Kandinsky5Transformer3DModel`, ComfyUI `kandinsky5`), as
data. Its single-file names are diffusers' own (ComfyUI detects and loads them unchanged), bare or under
`model.diffusion_model.`.

A visual block `visual_transformer_blocks.{i}` has a self-attention over the video / image tokens (`[dit.self]`)
and a cross-attention from them to the text (`[dit.cross]`); label B{i:02d}. Each projects `to_query`,
`to_key`, `to_value` and normalises q and k per head (`query_norm` / `key_norm`, one RMSNorm weight of the head
width shared by the heads, before RoPE), so q/k scale those norm weights (uniform over heads), v `to_value`,
out `out_layer`, weight and bias. The text blocks (`text_transformer_blocks`: self-attention over the Qwen2.5-VL
features before any visual block sees them, like HunyuanVideo's token refiner) are left alone.
"""

from __future__ import annotations

import re

from .dit_files import dit_tensor_names, scan
from .types import CheckpointFile, Identified, Site
from .wan import identified, model_prefix, refuse_unknown_modules

COMPONENTS = ("dit",)
KEY = "visual_transformer_blocks.0.cross_attention.key_norm.weight"     # ComfyUI's detection key
NAME = "Kandinsky 5"
ATTENTION = re.compile(r"^visual_transformer_blocks\.(?P<i>\d+)\.(?P<a>self_attention|cross_attention)\."
                       r"(?P<t>query_norm\.weight|key_norm\.weight|(?:to_value|out_layer)\.(?:weight|bias))$")
SECTION = {"self_attention": "self", "cross_attention": "cross"}
PROJ = {"query_norm": "q", "key_norm": "k", "to_value": "v", "out_layer": "out"}
_ATTENTION = ("to_query", "to_key", "to_value", "query_norm", "key_norm", "out_layer")
BLOCKS = {"visual_transformer_blocks": ("visual_modulation", "self_attention", "cross_attention", "feed_forward",
                                        "self_attention_norm", "cross_attention_norm", "feed_forward_norm"),
          "text_transformer_blocks": ("text_modulation", "self_attention", "feed_forward", "self_attention_norm",
                                      "feed_forward_norm")}
PARTS = {"self_attention": _ATTENTION, "cross_attention": _ATTENTION}

# model width → released model (ComfyUI's detection reads the same widths)
SIZES = {1792: "kandinsky5-lite-video", 2560: "kandinsky5-lite-image", 4096: "kandinsky5-pro-video"}
ARCHITECTURE = "kandinsky5"
ARCHITECTURE_NAMES = {ARCHITECTURE: (ARCHITECTURE, *SIZES.values()), **{n: (n,) for n in SIZES.values()}}
DIFFUSERS_PIPELINES: dict = {}   # read sub-folder by sub-folder (its Qwen2.5-VL and CLIP-L encoders by their configs)
TRANSFORMER_CLASS = "Kandinsky5Transformer3DModel"
NOT_REACHED = (("text_transformer_blocks", "Kandinsky 5's text blocks (self-attention over the text features)"),)


def architecture(width: int) -> str:
    return SIZES.get(width, ARCHITECTURE)


def identify(header) -> Identified | None:
    found = model_prefix(set(header.names), (KEY,))
    if found is None:
        return None
    prefix = found[0]
    refuse_unknown_modules(header, prefix, NAME, BLOCKS, PARTS)
    width_key = prefix + "visual_embeddings.in_layer.weight"
    shape = header.tensor(width_key).shape if width_key in header.names else ()
    return identified(header, prefix, architecture(shape[0] if len(shape) == 2 else 0))


def _prefix(files) -> str | None:
    found = model_prefix(dit_tensor_names(files), (KEY,))
    return found[0] if found else None


def sites(cf: CheckpointFile, files) -> list[Site]:
    return [Site(cf.rel, t.name, "dit", SECTION[m["a"]], PROJ[m["t"].rsplit(".", 1)[0]], block=f"B{int(m['i']):02d}")
            for t, m in scan(cf, _prefix(files), ATTENTION)]


def folder_architecture(model_class: str, present: set[str], config: dict | None = None) -> str | None:
    return architecture((config or {}).get("model_dim", 0)) if model_class == TRANSFORMER_CLASS else None


def has_qk_norm(files) -> bool:
    return False   # no unet.* sites: q/k factors of [dit.self] / [dit.cross] scale the qk-norm weights themselves
